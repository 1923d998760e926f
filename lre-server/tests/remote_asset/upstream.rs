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

/// A loopback HTTP server with fixed replies that counts the requests for each path, and
/// keeps the headers of the last request to each.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    headers: Arc<Mutex<HashMap<String, axum::http::HeaderMap>>>,
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
        let headers = Arc::new(Mutex::new(HashMap::new()));
        let (counted, kept) = (hits.clone(), headers.clone());
        let app = axum::Router::new().fallback(move |uri: Uri, h: axum::http::HeaderMap| {
            let (routes, hits, kept) = (routes.clone(), counted.clone(), kept.clone());
            async move {
                *hits
                    .lock()
                    .unwrap()
                    .entry(uri.path().to_string())
                    .or_insert(0) += 1;
                kept.lock().unwrap().insert(uri.path().to_string(), h);
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
            headers,
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

    /// The value of header `name` in the last request to `path`.
    pub fn header(&self, path: &str, name: &str) -> Option<String> {
        let h = self.headers.lock().unwrap();
        h.get(path)?
            .get(name)
            .map(|v| v.to_str().unwrap_or("?").to_string())
    }

    pub fn total(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}
