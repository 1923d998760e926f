//! Instance names: the prefix of every REAPI resource name, one action-cache namespace each.

use crate::error::{Result, StoreError as Error};

/// Path segments REAPI reserves inside resource names; an instance name may not use them.
const RESERVED: &[&str] = &[
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// Longest instance name accepted. Names are copied into keys, logs and the status
/// history; without a bound one call could make each of those copies megabytes long.
pub const MAX_NAME: usize = 256;

pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > MAX_NAME {
        return Err(Error::InvalidArgument(format!(
            "instance name of {} bytes is longer than {MAX_NAME}",
            name.len()
        )));
    }
    for seg in name.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(Error::InvalidArgument(format!(
                "instance name {name:?} has an empty, '.' or '..' segment"
            )));
        }
        if RESERVED.contains(&seg) {
            return Err(Error::InvalidArgument(format!(
                "instance name {name:?} uses the reserved segment {seg:?}"
            )));
        }
    }
    Ok(())
}
