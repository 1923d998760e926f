//! Content addresses (`CA:` in a narinfo): a path whose name is computed from its own
//! content, so a cache can check it without trusting any key. Nix 2.8 writes
//! `fixed:r:sha256:<h>` (a recursive fixed output or `nix-store --add`: h is the NAR's
//! hash), `fixed:sha256:<h>` (a flat file: h is its contents' hash) and `text:sha256:<h>`
//! (`builtins.toFile`, derivations). Other algorithms are refused: nothing could vouch
//! for them short of a signature.

use sha2::{Digest as _, Sha256};

use crate::error::{excerpt, FormatError};
use crate::hash::NixHash;
use crate::nar::Root;
use crate::store_path::StorePath;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentAddress {
    Recursive(NixHash),
    Flat(NixHash),
    Text(NixHash),
}

impl ContentAddress {
    pub fn parse(s: &str) -> Result<ContentAddress, FormatError> {
        let bad = |why: &str| FormatError::ContentAddress(format!("{}: {why}", excerpt(s)));
        let (ctor, hash): (fn(NixHash) -> ContentAddress, &str) =
            if let Some(h) = s.strip_prefix("fixed:r:") {
                (ContentAddress::Recursive, h)
            } else if let Some(h) = s.strip_prefix("text:") {
                (ContentAddress::Text, h)
            } else if let Some(h) = s.strip_prefix("fixed:") {
                (ContentAddress::Flat, h)
            } else {
                return Err(bad(
                    "expected fixed:r:sha256:, fixed:sha256: or text:sha256:",
                ));
            };
        if !hash.starts_with("sha256:") {
            return Err(bad(
                "only SHA-256 content addresses can be verified; sign the path instead",
            ));
        }
        Ok(ctor(NixHash::parse(hash)?))
    }

    /// Checks that `path`, with `references` (which may include itself), whose NAR hashes
    /// to `nar_hash` and has `root`, is this content address. `Err` says what differs.
    pub fn verify(
        &self,
        path: &StorePath,
        references: &[StorePath],
        nar_hash: &NixHash,
        root: &Root,
    ) -> Result<(), String> {
        let self_ref = references.contains(path);
        let others: Vec<&StorePath> = references.iter().filter(|r| *r != path).collect();
        let flat_contents = |what: &str| {
            match root {
            Root::Regular {
                executable: false,
                contents,
            } => Ok(*contents),
            _ => Err(format!(
                "a {what} content address names a single non-executable file, and this NAR is not one"
            )),
        }
        };
        let expected = match self {
            ContentAddress::Recursive(h) => {
                if h != nar_hash {
                    return Err(format!(
                        "its content address names NAR hash {h}, the NAR hashes to {nar_hash}"
                    ));
                }
                StorePath::make(&make_type("source", &others, self_ref), h, path.name())
            }
            ContentAddress::Flat(h) => {
                let contents = flat_contents("flat")?;
                if contents != *h || !references.is_empty() {
                    return Err(format!(
                        "its content address names file hash {h} and no references; the file hashes to {contents} with {} references",
                        references.len()
                    ));
                }
                let inner = NixHash(
                    Sha256::digest(format!("fixed:out:sha256:{}:", h.hex()).as_bytes()).into(),
                );
                StorePath::make("output:out", &inner, path.name())
            }
            ContentAddress::Text(h) => {
                let contents = flat_contents("text")?;
                if contents != *h || self_ref {
                    return Err(format!(
                        "its content address names text hash {h}; the file hashes to {contents}{}",
                        if self_ref { " and refers to itself" } else { "" }
                    ));
                }
                StorePath::make(&make_type("text", &others, false), h, path.name())
            }
        }
        .map_err(|e| e.to_string())?;
        if expected != *path {
            return Err(format!(
                "its content address makes the path {expected}, not {path}"
            ));
        }
        Ok(())
    }
}

/// Nix's `makeType`: the kind, each reference's full path (sorted by base name), `self`.
fn make_type(kind: &str, references: &[&StorePath], self_ref: bool) -> String {
    let mut refs: Vec<&&StorePath> = references.iter().collect();
    refs.sort_by_key(|r| r.base_name());
    let mut s = kind.to_string();
    for r in refs {
        s.push(':');
        s.push_str(&r.to_string());
    }
    if self_ref {
        s.push_str(":self");
    }
    s
}
