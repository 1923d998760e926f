//! lre-server: a Remote Execution API v2 cache (CAS, ActionCache, ByteStream, Capabilities)
//! and Bazel HTTP cache over one durable, size-bounded store, with access control.

pub mod action_cache;
pub mod activity;
pub mod allocator;
pub mod asset;
pub mod auth;
pub mod blob_response;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod config;
pub mod connections;
pub mod context;
pub mod error;
pub mod execution;
pub mod http;
pub mod instance;
pub mod longrunning;
pub mod metrics;
pub mod nix_cache;
pub mod operations;
pub mod provenance;
pub mod request_meta;
pub mod scheduler;
pub mod server;
pub mod status;
pub mod tls;
pub mod worker_service;

// One digest rule for server and worker: both come from lre-store.
pub use lre_store::{digest, resource_name, store};

pub use config::Config;
pub use server::{start, RunningServer, StartError};
