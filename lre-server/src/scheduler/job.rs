//! What a worker needs to run one action: the Action and Command (fetched and checked by
//! Execute), its timeout and what the client said about it. One `Job` is shared by every
//! waiter of a deduplicated action.

use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::Command;
use bytes::Bytes;

use crate::digest::Digest;
use crate::request_meta::RequestMeta;

/// What makes two executions the same, for deduplication: the instance and the action.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ActionKey {
    pub instance: String,
    pub action: Digest,
}

#[derive(Debug)]
pub struct Job {
    pub key: ActionKey,
    pub action: Bytes,
    pub command: Bytes,
    pub timeout: Duration,
    pub do_not_cache: bool,
    /// What the client said about the action, for the status page.
    pub meta: Option<RequestMeta>,
    /// The action's first declared output, which names it on the status page.
    pub first_output: String,
}

/// The action's first declared output (REAPI 2.1's `output_paths`, else the older lists).
#[allow(deprecated)]
pub fn first_output(c: &Command) -> String {
    c.output_paths
        .first()
        .or(c.output_files.first())
        .or(c.output_directories.first())
        .cloned()
        .unwrap_or_default()
}
