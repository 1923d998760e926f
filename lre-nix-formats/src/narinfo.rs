//! `.narinfo` files: what a binary cache says about one store path. Parsing keeps what
//! a cache must check (path, NAR hash and size, references, signatures, content address)
//! and refuses anything it cannot trust; rendering writes the canonical form lre serves,
//! which points at the uncompressed NAR in its CAS (`nar/<NarHash>.nar`).
//!
//! Invariants: a parsed narinfo has a valid store path, a SHA-256 NarHash, and at most
//! `MAX_REFERENCES` references and `MAX_SIGNATURES` signatures; references are sorted by
//! base name and unique, as Nix's fingerprint needs them.

use crate::error::{excerpt, FormatError};
use crate::hash::NixHash;
use crate::signature::Signature;
use crate::store_path::StorePath;

pub const MAX_REFERENCES: usize = 10_000;
pub const MAX_SIGNATURES: usize = 32;
/// A narinfo is small; one with ten thousand references is under 600 KiB.
pub const MAX_SIZE: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// As uploaded: `nar/<FileHash>.nar[.xz|.zst]`.
    pub url: String,
    pub compression: String,
    pub file_hash: Option<NixHash>,
    pub file_size: Option<u64>,
    pub nar_hash: NixHash,
    pub nar_size: u64,
    /// Sorted by base name, unique.
    pub references: Vec<StorePath>,
    pub deriver: Option<String>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
}

fn bad(why: String) -> FormatError {
    FormatError::NarInfo(why)
}

impl NarInfo {
    pub fn parse(text: &str) -> Result<NarInfo, FormatError> {
        if text.len() > MAX_SIZE {
            return Err(bad(format!("larger than {MAX_SIZE} bytes")));
        }
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.split_once(':').map(|(k, v)| (k, v.trim_start())))
                .ok_or_else(|| bad(format!("line {} is not <Key>: <value>", excerpt(line))))?;
            let once = |taken: bool| {
                if taken {
                    Err(bad(format!("{key} appears twice")))
                } else {
                    Ok(())
                }
            };
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{key}: {} is not a number", excerpt(v))))
            };
            match key {
                "StorePath" => {
                    once(store_path.is_some())?;
                    store_path = Some(StorePath::parse(value)?);
                }
                "URL" => {
                    once(url.is_some())?;
                    url = Some(value.to_string());
                }
                "Compression" => {
                    once(compression.is_some())?;
                    compression = Some(value.to_string());
                }
                "FileHash" => {
                    once(file_hash.is_some())?;
                    file_hash = Some(NixHash::parse(value)?);
                }
                "FileSize" => {
                    once(file_size.is_some())?;
                    file_size = Some(number(value)?);
                }
                "NarHash" => {
                    once(nar_hash.is_some())?;
                    nar_hash = Some(NixHash::parse(value)?);
                }
                "NarSize" => {
                    once(nar_size.is_some())?;
                    nar_size = Some(number(value)?);
                }
                "References" => {
                    once(references.is_some())?;
                    let mut refs = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(StorePath::from_base_name)
                        .collect::<Result<Vec<_>, _>>()?;
                    if refs.len() > MAX_REFERENCES {
                        return Err(bad(format!("more than {MAX_REFERENCES} references")));
                    }
                    refs.sort_by_key(|r| r.base_name());
                    refs.dedup();
                    references = Some(refs);
                }
                "Deriver" => {
                    once(deriver.is_some())?;
                    if value != "unknown-deriver" {
                        deriver = Some(StorePath::from_base_name(value)?.base_name());
                    }
                }
                "Sig" => {
                    if sigs.len() == MAX_SIGNATURES {
                        return Err(bad(format!("more than {MAX_SIGNATURES} signatures")));
                    }
                    sigs.push(Signature::parse(value)?);
                }
                "CA" => {
                    once(ca.is_some())?;
                    ca = Some(value.to_string());
                }
                // Nix writes System: for some paths and ignores what it does not know.
                _ => {}
            }
        }
        let missing = |k: &str| bad(format!("no {k}: line"));
        Ok(NarInfo {
            store_path: store_path.ok_or_else(|| missing("StorePath"))?,
            url: url.ok_or_else(|| missing("URL"))?,
            compression: compression.unwrap_or_else(|| "bzip2".into()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: nar_size.ok_or_else(|| missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            sigs,
            ca,
        })
    }

    /// What a signature signs: `1;<path>;<NarHash>;<NarSize>;<references, comma-separated>`.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self.references.iter().map(|r| r.to_string()).collect();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash,
            self.nar_size,
            refs.join(",")
        )
    }

    /// The references other than the path itself.
    pub fn other_references(&self) -> impl Iterator<Item = &StorePath> {
        self.references
            .iter()
            .filter(move |r| **r != self.store_path)
    }

    /// The uncompressed NAR's file name, relative to the cache root.
    pub fn nar_url(&self) -> String {
        format!("nar/{}.nar", self.nar_hash.base32())
    }

    /// The form lre serves: the uncompressed NAR (`Compression: none`), every other field
    /// as given.
    pub fn render_served(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("StorePath: {}\n", self.store_path));
        s.push_str(&format!("URL: {}\n", self.nar_url()));
        s.push_str("Compression: none\n");
        s.push_str(&format!("FileHash: {}\n", self.nar_hash));
        s.push_str(&format!("FileSize: {}\n", self.nar_size));
        s.push_str(&format!("NarHash: {}\n", self.nar_hash));
        s.push_str(&format!("NarSize: {}\n", self.nar_size));
        let refs: Vec<String> = self.references.iter().map(|r| r.base_name()).collect();
        s.push_str(&format!("References: {}\n", refs.join(" ")));
        if let Some(d) = &self.deriver {
            s.push_str(&format!("Deriver: {d}\n"));
        }
        for sig in &self.sigs {
            s.push_str(&format!("Sig: {sig}\n"));
        }
        if let Some(ca) = &self.ca {
            s.push_str(&format!("CA: {ca}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "StorePath: /nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello\n\
URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz\n\
Compression: xz\n\
FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3\n\
FileSize: 100\n\
NarHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3\n\
NarSize: 226\n\
References: 0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello 00000000000000000000000000000000-b\n\
Deriver: 11111111111111111111111111111111-hello.drv\n";

    #[test]
    fn parses_renders_and_fingerprints() {
        let i = NarInfo::parse(INFO).unwrap();
        assert_eq!(i.nar_size, 226);
        // Sorted by base name: "0000…-b" first.
        assert_eq!(
            i.fingerprint(),
            "1;/nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello;\
             sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3;226;\
             /nix/store/00000000000000000000000000000000-b,\
             /nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello"
        );
        assert_eq!(i.other_references().count(), 1);
        let again = NarInfo::parse(&i.render_served()).unwrap();
        assert_eq!(again.fingerprint(), i.fingerprint());
        assert_eq!(again.compression, "none");
    }

    #[test]
    fn refuses_missing_twice_and_bad_fields() {
        assert!(NarInfo::parse(&INFO.replace("NarSize: 226\n", "")).is_err());
        assert!(NarInfo::parse(&format!("{INFO}NarSize: 1\n")).is_err());
        assert!(NarInfo::parse(&INFO.replace("-hello\nURL", "-../x\nURL")).is_err());
        assert!(NarInfo::parse(&INFO.replace("NarHash: sha256:", "NarHash: md5:")).is_err());
        assert!(NarInfo::parse(&format!("{INFO}Sig: k:AAAA\n")).is_err());
        assert!(NarInfo::parse(&"x".repeat(MAX_SIZE + 1)).is_err());
    }
}
