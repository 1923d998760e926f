//! What a Nix binary-cache URL names: `/{instance}/nix/nix-cache-info`,
//! `/{instance}/nix/<hash part>.narinfo` and `/{instance}/nix/nar/<hash>.nar[.xz|.zst]`
//! (the default instance: `/nix/...`). A path is one of these only if its tail parses as
//! one; everything else is left to the HTTP cache's `ac`/`cas` paths.

use lre_nix_formats::{nixbase32, NixHash};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
}

impl Compression {
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => ".nar",
            Compression::Xz => ".nar.xz",
            Compression::Zstd => ".nar.zst",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    CacheInfo,
    /// The 32-character hash part of a store path.
    NarInfo(String),
    /// A toolchain's closure manifest, by its `lre-closure:sha256:` id (64 hex digits).
    Closure(String),
    /// A NAR file named by the hash of its (compressed) bytes.
    Nar {
        file_hash: NixHash,
        compression: Compression,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixPath {
    pub instance: String,
    pub target: Target,
}

/// `None` when `path` is not a binary-cache path; `Some(Err)` when it is one with a bad
/// file name (a NAR compressed in a way lre does not take, a malformed hash).
pub fn parse(path: &str) -> Option<Result<NixPath>> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let n = segs.len();
    let instance = |k: usize| segs[..k].join("/");
    if n >= 2 && segs[n - 2] == "nix" {
        let last = segs[n - 1];
        if last == "nix-cache-info" {
            return Some(Ok(NixPath {
                instance: instance(n - 2),
                target: Target::CacheInfo,
            }));
        }
        if let Some(hash) = last.strip_suffix(".narinfo") {
            return Some(
                nixbase32::decode(hash, 20)
                    .map(|_| NixPath {
                        instance: instance(n - 2),
                        target: Target::NarInfo(hash.to_string()),
                    })
                    .map_err(|e| Error::NotFound(format!("{path}: {e}"))),
            );
        }
    }
    if n >= 3 && segs[n - 3] == "nix" && segs[n - 2] == "closure" {
        let id = segs[n - 1];
        let hex = id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        return Some(if hex {
            Ok(NixPath {
                instance: instance(n - 3),
                target: Target::Closure(id.to_string()),
            })
        } else {
            Err(Error::NotFound(format!(
                "{path}: a closure is named by the 64 lowercase hex digits of its lre-closure:sha256: id"
            )))
        });
    }
    if n >= 3 && segs[n - 3] == "nix" && segs[n - 2] == "nar" {
        return Some(nar_file(segs[n - 1]).map(|target| NixPath {
            instance: instance(n - 3),
            target,
        }));
    }
    None
}

fn nar_file(name: &str) -> Result<Target> {
    let (hash, compression) = if let Some(h) = name.strip_suffix(".nar") {
        (h, Compression::None)
    } else if let Some(h) = name.strip_suffix(".nar.xz") {
        (h, Compression::Xz)
    } else if let Some(h) = name.strip_suffix(".nar.zst") {
        (h, Compression::Zstd)
    } else {
        return Err(Error::Unsupported(format!(
            "nar/{name}: lre's binary cache takes NARs uncompressed, xz or zstd; copy with \
             `nix copy --to 'http://HOST/nix?compression=zstd'`"
        )));
    };
    let bytes =
        nixbase32::decode(hash, 32).map_err(|e| Error::NotFound(format!("nar/{name}: {e}")))?;
    Ok(Target::Nar {
        file_hash: NixHash(bytes.try_into().expect("32 bytes decoded")),
        compression,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H52: &str = "1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3";
    const H32: &str = "0c6kzph7l0dcbfmjap64f0czdafn3b7x";

    #[test]
    fn names_instance_and_target() {
        let p = parse("/nix/nix-cache-info").unwrap().unwrap();
        assert_eq!((p.instance.as_str(), p.target), ("", Target::CacheInfo));
        let p = parse(&format!("/team/a/nix/{H32}.narinfo"))
            .unwrap()
            .unwrap();
        assert_eq!(p.instance, "team/a");
        assert_eq!(p.target, Target::NarInfo(H32.into()));
        let p = parse(&format!("/main/nix/nar/{H52}.nar.xz"))
            .unwrap()
            .unwrap();
        assert!(matches!(
            p.target,
            Target::Nar {
                compression: Compression::Xz,
                ..
            }
        ));
        assert!(parse(&format!("/nix/nar/{H52}.nar.bz2")).unwrap().is_err());
        assert!(parse("/nix/nope.narinfo").unwrap().is_err());
        assert!(parse(&format!("/cas/{}", "0".repeat(64))).is_none());
        assert!(parse("/nix/other").is_none());
        let id = "ab".repeat(32);
        let p = parse(&format!("/m/nix/closure/{id}")).unwrap().unwrap();
        assert_eq!((p.instance.as_str(), p.target), ("m", Target::Closure(id)));
        assert!(parse("/nix/closure/AB").unwrap().is_err());
    }
}
