//! Store paths, `/nix/store/<32 nixbase32 characters>-<name>`, and how Nix computes the
//! path of a content-addressed object (`makeStorePath` and friends), so a server can
//! check that a path claiming a content address really is that address.
//!
//! Invariants: a parsed path's name satisfies Nix's rule (at most 211 characters of
//! `A-Za-z0-9+-._?=`, not starting with `.`), so it is one safe file name: no `/`, never
//! `.` or `..`. Only the store directory `/nix/store` exists here: lre's toolchains are
//! pinned to it.

use sha2::{Digest as _, Sha256};

use crate::error::{excerpt, FormatError};
use crate::hash::NixHash;
use crate::nixbase32;

pub const STORE_DIR: &str = "/nix/store";
/// Nix's limit on a store path's name.
pub const MAX_NAME: usize = 211;
const HASH_CHARS: usize = 32;

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct StorePath {
    /// The 20-byte digest the path's first 32 characters encode.
    hash: [u8; 20],
    name: String,
}

impl StorePath {
    /// `/nix/store/<hash>-<name>`.
    pub fn parse(path: &str) -> Result<StorePath, FormatError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .ok_or_else(|| {
                FormatError::StorePath(format!("{}: not under {STORE_DIR}/", excerpt(path)))
            })?;
        StorePath::from_base_name(base)
    }

    /// `<hash>-<name>`, the form narinfo `References:` lines use.
    pub fn from_base_name(base: &str) -> Result<StorePath, FormatError> {
        let bad = |why: &str| FormatError::StorePath(format!("{}: {why}", excerpt(base)));
        if base.len() < HASH_CHARS + 2 || base.as_bytes()[HASH_CHARS] != b'-' {
            return Err(bad("expected <32 nixbase32 characters>-<name>"));
        }
        let hash = nixbase32::decode(&base[..HASH_CHARS], 20).map_err(|e| bad(&e.to_string()))?;
        let name = &base[HASH_CHARS + 1..];
        check_name(name).map_err(|why| bad(&why))?;
        Ok(StorePath {
            hash: hash.try_into().expect("decode returns 20 bytes"),
            name: name.to_string(),
        })
    }

    /// The 32-character hash part: also the name of the path's narinfo file.
    pub fn hash_part(&self) -> String {
        nixbase32::encode(&self.hash)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_part(), self.name)
    }

    /// Nix's `makeStorePath`: the path of an object of `kind` (`source:…`, `text:…`,
    /// `output:out`) whose inner hash is `hash`.
    pub fn make(kind: &str, hash: &NixHash, name: &str) -> Result<StorePath, FormatError> {
        check_name(name)
            .map_err(|why| FormatError::StorePath(format!("{}: {why}", excerpt(name))))?;
        let s = format!("{kind}:sha256:{}:{STORE_DIR}:{name}", hash.hex());
        let full: [u8; 32] = Sha256::digest(s.as_bytes()).into();
        // Nix's compressHash: XOR-fold the 32 bytes into 20.
        let mut hash = [0u8; 20];
        for (i, b) in full.iter().enumerate() {
            hash[i % 20] ^= b;
        }
        Ok(StorePath {
            hash,
            name: name.to_string(),
        })
    }
}

/// `/nix/store/<hash>-<name>`.
impl std::fmt::Display for StorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base_name())
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a name has 1 to {MAX_NAME} characters"));
    }
    if name.starts_with('.') {
        return Err("a name may not start with '.'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
    {
        return Err(format!("{c:?} is not allowed in a store path name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_refuses_escapes() {
        let p = StorePath::parse("/nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello-2.12").unwrap();
        assert_eq!(p.name(), "hello-2.12");
        assert_eq!(
            p.to_string(),
            "/nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello-2.12"
        );
        for bad in [
            "/nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-..",
            "/nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-.hidden",
            "/nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-a/b",
            "/nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-",
            "/nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7e-x",
            "/tmp/0c6kzph7l0dcbfmjap64f0czdafn3b7x-x",
            "/nix/store/short-x",
        ] {
            assert!(StorePath::parse(bad).is_err(), "{bad}");
        }
    }
}
