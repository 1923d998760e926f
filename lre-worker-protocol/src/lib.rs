//! The scheduler↔worker protocol (`proto/lre/worker/v1/worker.proto`), shared by
//! lre-server and lre-worker.

pub mod v1 {
    tonic::include_proto!("lre.worker.v1");
}
