//! Test helpers shared by lre's crates, as a dev-only crate (no `#[path]` includes across
//! crates): real redis-server and Garage clusters run by the e2e tests' own scripts,
//! deterministic incompressible data, and store helpers.

pub mod garage;
pub mod noise;
pub mod redis;
pub mod store;

pub use garage::Garage;
pub use noise::noise;
pub use store::{put, read_all, sha, Counting};

/// The repository's root, where `e2e/` and its scripts are.
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
