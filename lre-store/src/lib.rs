//! lre-store: what lre stores and how it names it, shared by `lre-server` and `lre-worker`
//! so that both accept and refuse exactly the same digests and resource names.
//!
//! Today it holds the digest type and ByteStream resource names; the blob-store trait and
//! its layers move here next (issue 11).

pub mod digest;
pub mod error;
pub mod instance_name;
pub mod resource_name;

pub use digest::Digest;
pub use error::{Result, StoreError};
