//! The subset of Nix's formats a binary cache needs, written here because the one
//! complete Rust implementation (snix's `nix-compat`) is GPL-3.0 and its crates.io name is
//! an empty placeholder: lre is Apache-2.0. Every format is tested differentially against
//! the `nix` CLI (`tests/against_nix.rs`), and the NAR parser is fuzzed.
//!
//! Invariants: nothing here allocates in proportion to its input beyond the bounds each
//! module names, and nothing touches a file system: callers decide where bytes go.

pub mod content_address;
pub mod error;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signature;
pub mod store_path;

pub use error::FormatError;
pub use hash::NixHash;
pub use nar::{NarParser, NarSink, NarSummary};
pub use narinfo::NarInfo;
pub use signature::{PublicKey, SecretKey, Signature};
pub use store_path::StorePath;
