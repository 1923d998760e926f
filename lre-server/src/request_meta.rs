//! What a client says about a call: Bazel's `RequestMetadata` (which invocation, which
//! action), and who made the call. It feeds the status page and travels with a job through
//! the scheduler; it never decides anything.

use bazel_remote_apis::build::bazel::remote::execution::v2::RequestMetadata;
use prost::Message;
use serde::Serialize;

/// The gRPC header Bazel sends with every call (binary, base64 on the wire).
pub const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";
/// Longest text kept from a client (ids, mnemonics, labels, paths).
pub const MAX_TEXT: usize = 256;

/// What Bazel says about a call (which invocation, which action), and who made it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestMeta {
    pub invocation: String,
    pub correlated: String,
    pub mnemonic: String,
    pub target: String,
    pub tool: String,
    /// The caller's token name, empty when anonymous: the history is kept per caller, so
    /// no caller can add to, or push out, another's invocations.
    pub caller: String,
}

impl RequestMeta {
    /// The call's RequestMetadata, if it has one naming an invocation. A malformed header
    /// is ignored: it only feeds the status page, never a decision.
    pub fn of<T>(req: &tonic::Request<T>) -> Option<RequestMeta> {
        let raw = req
            .metadata()
            .get_bin(REQUEST_METADATA_HEADER)?
            .to_bytes()
            .ok()?;
        let m = RequestMetadata::decode(raw).ok()?;
        if m.tool_invocation_id.is_empty() {
            return None;
        }
        let tool = m
            .tool_details
            // Debian's Bazel sends no version: no trailing blank then.
            .map(|t| {
                clip(
                    format!("{} {}", t.tool_name, t.tool_version)
                        .trim()
                        .to_string(),
                )
            })
            .unwrap_or_default();
        Some(RequestMeta {
            invocation: clip(m.tool_invocation_id),
            correlated: clip(m.correlated_invocations_id),
            mnemonic: clip(m.action_mnemonic),
            target: clip(m.target_id),
            tool,
            caller: String::new(),
        })
    }

    /// The call's metadata, as made by `caller`.
    pub fn of_caller<T>(
        req: &tonic::Request<T>,
        caller: &crate::auth::Principal,
    ) -> Option<RequestMeta> {
        Self::of(req).map(|mut m| {
            m.caller = caller.name.clone().unwrap_or_default();
            m
        })
    }
}

pub fn clip(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
