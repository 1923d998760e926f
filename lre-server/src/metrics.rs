//! Prometheus metrics, served on the HTTP port at `/metrics`.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

pub use lre_store::metrics::StoreMetrics;

fn latency_histogram() -> Histogram {
    // 50µs .. ~30s
    Histogram::new(exponential_buckets(0.00005, 2.5, 16))
}

pub struct Metrics {
    registry: Registry,
    pub store: StoreMetrics,
    /// Action-cache lookups by result: hit or miss; `incomplete` counts, again, the misses
    /// whose result was stored but withheld because a blob it references is gone.
    pub ac_lookups: Family<ResultLabel, Counter>,
    /// CAS blob lookups by result: hit, miss.
    pub cas_lookups: Family<ResultLabel, Counter>,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub request_seconds: Family<MethodLabel, Histogram, fn() -> Histogram>,
    /// Resumable ByteStream uploads held, running or interrupted.
    pub upload_sessions: Gauge,
    /// Memory held by the zstd decoders of compressed uploads.
    pub zstd_decoder_bytes: Gauge,
    /// ByteStream reads and writes ended because the client stopped taking or sending.
    pub stalled_streams: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let store = StoreMetrics::default();
        let ac_lookups: Family<ResultLabel, Counter> = Family::default();
        let cas_lookups: Family<ResultLabel, Counter> = Family::default();
        let bytes_received = Counter::default();
        let bytes_sent = Counter::default();
        let request_seconds: Family<MethodLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let upload_sessions = Gauge::default();
        let zstd_decoder_bytes = Gauge::default();
        let stalled_streams = Counter::default();
        let mut r = Registry::with_prefix("lre");
        r.register(
            "ac_lookups",
            "Action cache lookups by result",
            ac_lookups.clone(),
        );
        r.register(
            "cas_lookups",
            "CAS blob lookups by result",
            cas_lookups.clone(),
        );
        r.register(
            "received_bytes",
            "Blob bytes received from clients",
            bytes_received.clone(),
        );
        r.register(
            "sent_bytes",
            "Blob bytes sent to clients",
            bytes_sent.clone(),
        );
        r.register(
            "store_evictions",
            "Entries evicted to stay within the size limit",
            store.evictions.clone(),
        );
        r.register(
            "store_evicted_bytes",
            "Bytes evicted to stay within the size limit",
            store.evicted_bytes.clone(),
        );
        r.register(
            "store_size_bytes",
            "Bytes currently stored",
            store.size_bytes.clone(),
        );
        r.register(
            "store_entries",
            "Entries currently stored",
            store.entries.clone(),
        );
        r.register(
            "store_in_flight_bytes",
            "Bytes of unfinished uploads, counted against the store's size limit",
            store.in_flight_bytes.clone(),
        );
        r.register(
            "upload_sessions",
            "Resumable ByteStream uploads held, running or interrupted",
            upload_sessions.clone(),
        );
        r.register(
            "zstd_decoder_bytes",
            "Memory held by the zstd decoders of compressed uploads",
            zstd_decoder_bytes.clone(),
        );
        r.register(
            "stalled_streams",
            "ByteStream reads and writes ended because the client stopped taking or sending",
            stalled_streams.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Request latency by method",
            request_seconds.clone(),
        );
        Metrics {
            registry: r,
            store,
            ac_lookups,
            cas_lookups,
            bytes_received,
            bytes_sent,
            request_seconds,
            upload_sessions,
            zstd_decoder_bytes,
            stalled_streams,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn ac(&self, result: &'static str) {
        self.ac_lookups.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn cas(&self, hits: u64, misses: u64) {
        self.cas_lookups
            .get_or_create(&ResultLabel { result: "hit" })
            .inc_by(hits);
        self.cas_lookups
            .get_or_create(&ResultLabel { result: "miss" })
            .inc_by(misses);
    }

    /// Records the request's latency when the returned guard drops.
    pub fn timer(&self, method: &'static str) -> Timer<'_> {
        Timer {
            metrics: self,
            method,
            start: Instant::now(),
        }
    }
}

pub struct Timer<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.metrics
            .request_seconds
            .get_or_create(&MethodLabel {
                method: self.method,
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}
