//! A loopback HTTP upstream for the tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

#[derive(Clone)]
pub enum Reply {
    Body(Vec<u8>),
    /// Sent without a Content-Length, as a chunked stream.
    Chunked(Vec<u8>),
    Redirect(String),
}

/// A loopback HTTP server with fixed replies that counts the requests for each path.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(routes: impl FnOnce(SocketAddr) -> Vec<(&'static str, Reply)>) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Arc<HashMap<String, Reply>> = Arc::new(
            routes(addr)
                .into_iter()
                .map(|(p, r)| (p.to_string(), r))
                .collect(),
        );
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let counted = hits.clone();
        let app = axum::Router::new().fallback(move |uri: Uri| {
            let (routes, hits) = (routes.clone(), counted.clone());
            async move {
                *hits
                    .lock()
                    .unwrap()
                    .entry(uri.path().to_string())
                    .or_insert(0) += 1;
                match routes.get(uri.path()) {
                    Some(Reply::Body(b)) => b.clone().into_response(),
                    Some(Reply::Chunked(b)) => {
                        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                            b.chunks(1000).map(|c| Ok(c.to_vec())).collect();
                        Response::new(Body::from_stream(futures::stream::iter(chunks)))
                    }
                    Some(Reply::Redirect(to)) => {
                        (StatusCode::FOUND, [(header::LOCATION, to.clone())]).into_response()
                    }
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Upstream {
            addr,
            hits,
            stop,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}
