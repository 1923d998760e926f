//! What a store reports about itself. The server registers these handles with its
//! Prometheus registry; a store that is not watched gets `StoreMetrics::default()`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// What a store reports about itself; cheap handles cloned into the store.
#[derive(Clone, Default)]
pub struct StoreMetrics {
    pub evictions: Counter,
    pub evicted_bytes: Counter,
    pub size_bytes: Gauge,
    pub entries: Gauge,
    /// Bytes of unfinished uploads (the filesystem store's `tmp/`), counted against the limit.
    pub in_flight_bytes: Gauge,
}
