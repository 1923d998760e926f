//! The `[connections]` table: per-port caps and timeouts against slow, idle and flooding
//! clients.

use serde::Deserialize;

use super::{invalid, ConfigError};

/// The `[connections]` table. Each port (gRPC and HTTP) counts and limits its own
/// connections, so a flood on one leaves the other reachable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Connections one port holds at once; further ones are closed as soon as accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time from accepting a connection to a finished TLS handshake and, on the gRPC
    /// port, to the client's HTTP/2 connection preface.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_seconds: u64,
    /// HTTP port: a request's headers must arrive within this long of the connection
    /// opening or the previous response ending (so it also ends idle keep-alive
    /// connections).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_seconds: u64,
    /// HTTP port: a connection on which nothing is sent or received for this long is
    /// closed, also mid-request. gRPC port: a connection silent this long is sent an
    /// HTTP/2 PING.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
    /// gRPC port: a PING not answered within this long closes the connection.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_seconds: u64,
    /// gRPC port: calls running at once on one connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// gRPC port: a ByteStream read whose client takes nothing, or a write whose client
    /// sends nothing, for this long is ended with ABORTED, its file closed.
    #[serde(default = "default_stream_stall_timeout")]
    pub stream_stall_timeout_seconds: u64,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max_connections: default_max_connections(),
            handshake_timeout_seconds: default_handshake_timeout(),
            header_read_timeout_seconds: default_header_read_timeout(),
            idle_timeout_seconds: default_idle_timeout(),
            keepalive_timeout_seconds: default_keepalive_timeout(),
            max_concurrent_streams: default_max_concurrent_streams(),
            stream_stall_timeout_seconds: default_stream_stall_timeout(),
        }
    }
}

/// Two ports at this many each stay below the common 1024 open-file limit, with room for
/// the store.
fn default_max_connections() -> usize {
    400
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_header_read_timeout() -> u64 {
    30
}
fn default_idle_timeout() -> u64 {
    120
}
fn default_keepalive_timeout() -> u64 {
    20
}
fn default_max_concurrent_streams() -> u32 {
    1000
}

fn default_stream_stall_timeout() -> u64 {
    60
}

impl ConnectionsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (k, v) in [
            ("connections.max_connections", self.max_connections as u64),
            (
                "connections.handshake_timeout_seconds",
                self.handshake_timeout_seconds,
            ),
            (
                "connections.header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
            (
                "connections.idle_timeout_seconds",
                self.idle_timeout_seconds,
            ),
            (
                "connections.keepalive_timeout_seconds",
                self.keepalive_timeout_seconds,
            ),
            (
                "connections.max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            (
                "connections.stream_stall_timeout_seconds",
                self.stream_stall_timeout_seconds,
            ),
        ] {
            if v == 0 {
                return Err(invalid(k, "must be at least 1"));
            }
        }
        // tokio's semaphore holds at most usize::MAX >> 3 permits.
        if self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(invalid(
                "connections.max_connections",
                format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS),
            ));
        }
        Ok(())
    }
}
