//! Wires the store, the cache and both protocol front ends together, and runs them until
//! shutdown. `start` returns once both ports are bound, so tests can use port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    action_cache_server::ActionCacheServer, capabilities_server::CapabilitiesServer,
    content_addressable_storage_server::ContentAddressableStorageServer,
};
use bazel_remote_apis::google::bytestream::byte_stream_server::ByteStreamServer;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use bazel_remote_apis::build::bazel::remote::execution::v2::execution_server::ExecutionServer;
use bazel_remote_apis::google::longrunning::operations_server::OperationsServer;
use lre_worker_protocol::v1::worker_service_server::WorkerServiceServer;

use crate::action_cache::ActionCacheService;
use crate::auth::Authenticator;
use crate::bytestream::{ByteStreamService, StreamLimits};
use crate::capabilities::CapabilitiesService;
use crate::cas::CasService;
use crate::config::{Config, ConfigError};
use crate::connections::{spawn_acceptor, Conn, Limits};
use crate::context::ServerContext;
use crate::execution::ExecutionService;
use crate::instance::Instances;
use crate::metrics::Metrics;
use crate::operations::OperationsService;
use crate::scheduler::Scheduler;
use crate::store::BlobStore;
use crate::worker_service::WorkerEndpoint;

/// gRPC messages may carry a full batch plus framing. The decoder accepts up to four times
/// the batch limit so that an oversized batch reaches our own check and gets the spec's
/// INVALID_ARGUMENT with a useful message, rather than tonic's bare OUT_OF_RANGE.
const GRPC_MESSAGE_SLACK: usize = 1 << 20;
const GRPC_DECODE_FACTOR: usize = 4;
const GRPC_STREAM_WINDOW: u32 = 8 << 20;
const GRPC_CONNECTION_WINDOW: u32 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(crate::error::Error),
    /// A configured store could not be opened; `key` is its config table.
    /// (`error`, not `source`: the message says it already, and a `source` would be
    /// printed twice, as its own "Caused by".)
    #[error("{key}: {error}")]
    OpenStore {
        key: &'static str,
        error: crate::error::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("remote asset service: {0}")]
    Asset(crate::error::Error),
}

pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub tls: bool,
    /// What every service shares: stores, auth, metrics, the status history.
    pub context: Arc<ServerContext>,
    /// Present when execution is enabled; `lre up` registers its in-process workers here.
    pub scheduler: Option<Arc<Scheduler>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish (up to the grace period), and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.wait().await;
    }

    /// Waits until the servers stop (after `shutdown` or a fatal error).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }

    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// The Bazel flags that point a build at this server.
    pub fn bazel_flags(&self) -> Vec<String> {
        let scheme = if self.tls { "grpcs" } else { "grpc" };
        let flag = if self.scheduler.is_some() {
            "--remote_executor"
        } else {
            "--remote_cache"
        };
        vec![format!("{flag}={scheme}://{}", self.grpc_addr)]
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// The CAS store, and the action-cache store (the same one unless configured apart).
pub async fn open_stores(
    config: &Config,
    metrics: &Metrics,
) -> Result<(Arc<dyn BlobStore>, Arc<dyn BlobStore>), StartError> {
    // The metrics go to the CAS: a local action-cache store would overwrite its gauges.
    let open = |key, c, metrics| async move {
        crate::store::build(c, metrics)
            .await
            .map_err(|e| StartError::OpenStore {
                key,
                error: e.into(),
            })
    };
    let cas = open("store", &config.store, metrics.store.clone()).await?;
    let ac = match &config.action_cache_store {
        Some(c) => open("action_cache_store", c, Default::default()).await?,
        None => cas.clone(),
    };
    Ok((cas, ac))
}

pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    config.validate()?;
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let metrics = Arc::new(Metrics::new());
    let (store, action_results) = open_stores(&config, &metrics).await?;
    let auth = Authenticator::new(config.auth.anonymous, &config.auth.tokens)
        .map_err(StartError::Store)?;
    let cache = Arc::new(ServerContext {
        action_results: crate::context::checked_results(
            action_results,
            store.clone(),
            metrics.clone(),
        ),
        store,
        metrics,
        instances: Instances::new(config.instances.clone())
            .with_settings(config.instance_settings.clone()),
        auth,
        max_batch_total_size_bytes: config.max_batch_total_size_bytes,
        activity: crate::activity::Activity::new(config.status.clone()),
    });
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let (shutdown, rx) = watch::channel(false);

    let grpc_listener = bind(config.grpc_listen).await?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.grpc_listen,
            source,
        })?;
    let http_listener = match config.http_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());

    // Both ports do their own TLS handshakes (see `connections`), so each is bounded in time.
    let tls_acceptor = |alpn: &[u8]| -> Result<_, StartError> {
        Ok(match &config.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::rustls_config(
                t, alpn,
            )?)),
            None => None,
        })
    };
    let grpc_tls = tls_acceptor(crate::tls::ALPN_H2)?;
    let http_tls = tls_acceptor(crate::tls::ALPN_HTTP1)?;
    let conns = &config.connections;
    let handshake_timeout = Duration::from_secs(conns.handshake_timeout_seconds);
    let idle_timeout = Duration::from_secs(conns.idle_timeout_seconds);

    let max_msg =
        config.max_batch_total_size_bytes as usize * GRPC_DECODE_FACTOR + GRPC_MESSAGE_SLACK;
    // HTTP/2's default 64 KiB window caps an upload at one window per round trip; blob
    // uploads need windows the size of their messages.
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(GRPC_STREAM_WINDOW))
        .initial_connection_window_size(Some(GRPC_CONNECTION_WINDOW))
        .max_concurrent_streams(Some(conns.max_concurrent_streams))
        // A silent connection is PINGed; one that does not answer is closed.
        .http2_keepalive_interval(Some(idle_timeout))
        .http2_keepalive_timeout(Some(Duration::from_secs(conns.keepalive_timeout_seconds)));
    let exec = &config.execution;
    let mut tasks_early: Vec<JoinHandle<()>> = Vec::new();
    let mut router = builder
        .add_service(CapabilitiesServer::new(CapabilitiesService::new(
            cache.clone(),
            exec.enabled,
        )))
        .add_service(
            ContentAddressableStorageServer::new(CasService::new(cache.clone()))
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
        )
        .add_service(
            ActionCacheServer::new(ActionCacheService::new(cache.clone()))
                .max_decoding_message_size(max_msg),
        )
        .add_service(
            ByteStreamServer::new(ByteStreamService::with_limits(
                cache.clone(),
                Duration::from_secs(config.upload_ttl_seconds),
                StreamLimits {
                    stall_timeout: Duration::from_secs(
                        config.connections.stream_stall_timeout_seconds,
                    ),
                    ..StreamLimits::default()
                },
            ))
            .max_decoding_message_size(max_msg),
        );
    if config.asset.enabled {
        use bazel_remote_apis::build::bazel::remote::asset::v1::{
            fetch_server::FetchServer, push_server::PushServer,
        };
        let asset = Arc::new(
            crate::asset::AssetService::new(cache.clone(), &config.asset)
                .map_err(StartError::Asset)?,
        );
        router = router
            .add_service(FetchServer::from_arc(asset.clone()))
            .add_service(PushServer::from_arc(asset));
    }
    let scheduler =
        match exec.enabled {
            false => None,
            true => Some(crate::scheduler::build(exec).await.map_err(|error| {
                StartError::OpenStore {
                    key: "execution.redis",
                    error,
                }
            })?),
        };
    if let Some(scheduler) = &scheduler {
        // Every replica's workers, read once before serving: a replica that just started
        // must not refuse, for want of a worker it has not heard of, an action another
        // replica's worker can run.
        scheduler.prime().await;
        tasks_early.extend(scheduler.start(rx.clone()));
        let keepalive = Duration::from_secs(exec.keepalive_seconds);
        router = router
            .add_service(ExecutionServer::new(ExecutionService::new(
                cache.clone(),
                scheduler.clone(),
                exec.clone(),
            )))
            .add_service(OperationsServer::new(OperationsService::new(
                cache.clone(),
                scheduler.clone(),
            )))
            .add_service(
                WorkerServiceServer::new(WorkerEndpoint::new(
                    cache.clone(),
                    scheduler.clone(),
                    keepalive,
                    rx.clone(),
                ))
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
            );
    }
    let mut grpc_rx = rx.clone();
    let mut grace_rx = rx.clone();
    let stop_all = shutdown.clone();
    let (grpc_conns, grpc_acceptor) = spawn_acceptor(
        grpc_listener,
        grpc_tls,
        Limits {
            port: "grpc",
            max_connections: conns.max_connections,
            handshake_timeout,
            preface: true,
            // HTTP/2 PINGs (above) find silent peers; a byte-level idle limit would also
            // cut calls that legitimately wait, such as WaitExecution.
            idle_timeout: None,
        },
    );
    let grpc_task = tokio::spawn(async move {
        let signal = async move { stopped(&mut grpc_rx).await };
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::UnboundedReceiverStream::new(grpc_conns),
            Ok::<_, std::io::Error>,
        );
        let serve = router.serve_with_incoming_shutdown(incoming, signal);
        tokio::select! {
            r = serve => if let Err(e) = r {
                tracing::error!(error = %e, "gRPC server failed");
            },
            _ = async { stopped(&mut grace_rx).await; tokio::time::sleep(grace).await } => {
                tracing::warn!("gRPC calls still running after the grace period; closing them");
            }
        }
        // Whatever ended this front end ends the other too: never run half a server.
        let _ = stop_all.send(true);
    });
    let mut tasks = vec![grpc_task, grpc_acceptor];
    tasks.append(&mut tasks_early);

    if let Some(listener) = http_listener {
        let (http_conns, http_acceptor) = spawn_acceptor(
            listener,
            http_tls,
            Limits {
                port: "http",
                max_connections: conns.max_connections,
                handshake_timeout,
                preface: false,
                idle_timeout: Some(idle_timeout),
            },
        );
        let app = crate::http::router(
            cache.clone(),
            scheduler.clone(),
            crate::http::HostPolicy {
                tls: config.tls.is_some(),
                names: config.http_allowed_hosts.clone(),
            },
        );
        let stop_all = shutdown.clone();
        let rx = rx.clone();
        let header_timeout = Duration::from_secs(conns.header_read_timeout_seconds);
        tasks.push(tokio::spawn(async move {
            serve_http(http_conns, app, header_timeout, rx, grace).await;
            let _ = stop_all.send(true);
        }));
        tasks.push(http_acceptor);
    }
    // The status page's per-minute store figures are sampled, not pushed by the store.
    let sampler = {
        let (cache, mut rx) = (cache.clone(), rx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => cache.activity.sample(&cache.metrics),
                    _ = stopped(&mut rx) => break,
                }
            }
        })
    };
    tasks.push(sampler);
    tracing::info!(%grpc_addr, http_addr = ?http_addr, tls = config.tls.is_some(), "lre-server listening");
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        tls: config.tls.is_some(),
        context: cache,
        scheduler,
        shutdown,
        tasks,
    })
}

/// Resolves once shutdown is signalled (or the sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn serve_http(
    mut conns: mpsc::UnboundedReceiver<Conn>,
    app: axum::Router,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper enforces the header timeout only with a timer. It runs from the connection's
    // start and from the end of each response, so it also ends idle keep-alive connections.
    http.timer(TokioTimer::new())
        .header_read_timeout(Some(header_timeout));
    loop {
        let conn = tokio::select! {
            c = conns.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = stopped(&mut shutdown) => break,
        };
        let peer = conn.peer();
        let svc = TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        let http = http.clone();
        tokio::spawn(async move {
            if let Err(e) = watcher
                .watch(http.serve_connection(TokioIo::new(conn), svc))
                .await
            {
                tracing::debug!(?peer, error = %e, "http connection ended with an error");
            }
        });
    }
    // Stop accepting now, not after the grace period.
    drop(conns);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("http connections still open after the grace period; closing them");
    }
}
