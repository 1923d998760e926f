//! lre-store: what lre stores and how, shared by `lre-server` and `lre-worker` so that both
//! accept and refuse exactly the same digests and resource names.
//!
//! - `digest`, `instance_name`, `resource_name`: the names.
//! - `ac_entry`: what an action-cache entry holds (the result, its writer, what it
//!   references).
//! - `store`: the `BlobStore` trait and one file per kind (filesystem, memory, s3,
//!   redis, fast_slow), composed from a recursive `config::StoreConfig`.

pub mod ac_entry;
pub mod config;
pub mod digest;
pub mod error;
pub mod instance_name;
pub mod metrics;
pub mod resource_name;
pub mod store;
pub mod wire;

pub use digest::Digest;
pub use error::{Result, StoreError};
