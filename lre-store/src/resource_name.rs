//! ByteStream resource names, as REAPI defines them:
//! `{instance}/blobs/{hash}/{size}`, `{instance}/compressed-blobs/zstd/{hash}/{size}`, and for
//! writes `{instance}/uploads/{uuid}/(compressed-blobs/zstd|blobs)/{hash}/{size}{/metadata}`.
//! A digest function other than SHA-256 is named before the hash (REAPI 2.3):
//! `{instance}/blobs/blake3/{hash}/{size}`; SHA-256 may be named too, and usually is not.

use crate::digest::{Digest, DigestFunction};
use crate::error::{Result, StoreError as Error};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Identity,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobResource {
    pub instance: String,
    /// Only for uploads under `uploads/{uuid}/`: what makes a write resumable.
    pub upload_id: Option<String>,
    pub compression: Compression,
    pub digest: Digest,
}

/// Longer names are refused before any parsing: a real one is an instance name (itself
/// bounded), a uuid, a keyword, a hash and a size.
pub const MAX_RESOURCE_NAME: usize = 4096;

/// A name as quoted back in errors: its start only, so a hostile 16 MB name neither costs
/// memory to echo nor overflows the client's header limit.
fn shown(name: &str) -> String {
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    if end < name.len() {
        format!("{:?}… ({} bytes)", &name[..end], name.len())
    } else {
        format!("{name:?}")
    }
}

fn bad(name: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("malformed resource name {}: {why}", shown(name)))
}

pub fn parse_read(name: &str) -> Result<BlobResource> {
    parse(name, false)
}

pub fn parse_write(name: &str) -> Result<BlobResource> {
    parse(name, true)
}

fn parse(name: &str, write: bool) -> Result<BlobResource> {
    if name.len() > MAX_RESOURCE_NAME {
        return Err(bad(name, &format!("longer than {MAX_RESOURCE_NAME} bytes")));
    }
    let segs: Vec<&str> = name.split('/').collect();
    let keywords: &[&str] = if write {
        &["uploads", "blobs", "compressed-blobs"]
    } else {
        &["blobs", "compressed-blobs"]
    };
    let start = segs
        .iter()
        .position(|s| keywords.contains(s))
        .ok_or_else(|| bad(name, "no `blobs/` or `compressed-blobs/` segment"))?;
    let instance = segs[..start].join("/");
    crate::instance_name::validate_name(&instance)?;
    let mut rest = &segs[start..];

    let mut upload_id = None;
    if rest[0] == "uploads" {
        let id = rest
            .get(1)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad(name, "`uploads/` needs an id"))?;
        upload_id = Some(id.to_string());
        rest = &rest[2..];
    }
    let compression = match rest.first() {
        Some(&"blobs") => {
            rest = &rest[1..];
            Compression::Identity
        }
        Some(&"compressed-blobs") => {
            let c = match rest.get(1) {
                Some(&"zstd") => Compression::Zstd,
                Some(&"identity") => Compression::Identity,
                Some(other) => {
                    return Err(bad(
                        name,
                        &format!("compressor {other:?} is not supported; zstd is"),
                    ))
                }
                None => return Err(bad(name, "missing compressor")),
            };
            rest = &rest[2..];
            c
        }
        _ => {
            return Err(bad(
                name,
                "expected `blobs` or `compressed-blobs` after the upload id",
            ))
        }
    };
    // An optional digest-function segment; for SHA-256 the spec says to omit it. A hash
    // is 64 hex digits and a size all digits, so neither is taken for a function's name.
    let mut function = DigestFunction::Sha256;
    if let Some(f) = rest.first() {
        if f.len() != 64 && !f.chars().all(|c| c.is_ascii_digit()) {
            function = DigestFunction::parse_name(f).map_err(|why| bad(name, &why))?;
            rest = &rest[1..];
        }
    }
    let (hash, size) = match rest {
        [h, s] => (h, s),
        // Uploads may carry implementation-specific metadata after the size.
        [h, s, ..] if write => (h, s),
        _ => return Err(bad(name, "expected `{hash}/{size}` at the end")),
    };
    Ok(BlobResource {
        instance,
        upload_id,
        compression,
        digest: Digest::parse(function, hash, size)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn reads() {
        let r = parse_read(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(r.instance, "");
        assert_eq!(r.compression, Compression::Identity);
        let r = parse_read(&format!("a/b/compressed-blobs/zstd/{H}/0")).unwrap();
        assert_eq!(r.instance, "a/b");
        assert_eq!(r.compression, Compression::Zstd);
        assert!(parse_read(&format!("blobs/{H}/0/extra")).is_err());
        assert!(parse_read(&format!("uploads/x/blobs/{H}/0")).is_err());
        assert!(parse_read(&format!("compressed-blobs/lz4/{H}/0")).is_err());
        assert!(parse_read(&format!("blobs/{H}/-1")).is_err());
        assert!(parse_read("blobs/abc/1").is_err());
        assert_eq!(
            parse_read(&format!("blobs/sha256/{H}/1"))
                .unwrap()
                .digest
                .function,
            DigestFunction::Sha256
        );
        assert!(parse_read(&format!("blobs/sha1/{H}/1")).is_err());
        assert!(parse_read(&format!("blobs/BLAKE3/{H}/1")).is_err());
        assert!(parse_read(&format!("blobs/blake3/blake3/{H}/1")).is_err());
        assert!(parse_read("nonsense").is_err());
    }

    #[test]
    fn blake3_names_its_function_and_sha256_need_not() {
        let r = parse_read(&format!("a/blobs/blake3/{H}/5")).unwrap();
        assert_eq!(r.instance, "a");
        assert_eq!(r.digest.function, DigestFunction::Blake3);
        assert_eq!(r.digest.size, 5);
        let r = parse_read(&format!("compressed-blobs/zstd/blake3/{H}/5")).unwrap();
        assert_eq!(
            (r.compression, r.digest.function),
            (Compression::Zstd, DigestFunction::Blake3)
        );
        // The same hash without the segment is a SHA-256 digest: a different blob.
        let s = parse_read(&format!("a/blobs/{H}/5")).unwrap();
        assert_eq!(s.digest.function, DigestFunction::Sha256);
        assert_ne!(
            s.digest,
            parse_read(&format!("a/blobs/blake3/{H}/5")).unwrap().digest
        );
    }

    #[test]
    fn writes() {
        let w = parse_write(&format!("main/uploads/1234/blobs/{H}/0/meta/data")).unwrap();
        assert_eq!(w.instance, "main");
        assert_eq!(w.upload_id.as_deref(), Some("1234"));
        let w = parse_write(&format!("uploads/u/compressed-blobs/zstd/{H}/0")).unwrap();
        assert_eq!(w.compression, Compression::Zstd);
        let w = parse_write(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(w.upload_id, None);
        assert!(parse_write(&format!("uploads//blobs/{H}/0")).is_err());
        let w = parse_write(&format!("i/uploads/u/compressed-blobs/zstd/blake3/{H}/7/m")).unwrap();
        assert_eq!(
            (w.instance.as_str(), w.compression),
            ("i", Compression::Zstd)
        );
        assert_eq!(w.digest.function, DigestFunction::Blake3);
        assert_eq!(w.digest.size, 7);
        assert!(parse_write(&format!("uploads/u/{H}/0")).is_err());
    }
}
