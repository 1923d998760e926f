//! SHA-256 hashes as Nix writes them: `sha256:<nixbase32>` (what narinfo files and
//! fingerprints use), `sha256:<hex>`, or SRI `sha256-<base64>`. lre only needs SHA-256:
//! NarHash is always one, and a content address under another algorithm is refused by
//! the caller with a reason.

use base64::Engine as _;

use crate::error::{excerpt, FormatError};
use crate::nixbase32;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct NixHash(pub [u8; 32]);

impl NixHash {
    pub fn of(data: &[u8]) -> NixHash {
        use sha2::Digest as _;
        NixHash(sha2::Sha256::digest(data).into())
    }

    /// `sha256:<hash>`, the hash in nixbase32 or hex, or `sha256-<base64>`.
    pub fn parse(s: &str) -> Result<NixHash, FormatError> {
        let bad = |why: &str| FormatError::Hash(format!("{}: {why}", excerpt(s)));
        let bytes = if let Some(rest) = s.strip_prefix("sha256:") {
            match rest.len() {
                52 => nixbase32::decode(rest, 32).map_err(|e| bad(&e.to_string()))?,
                64 => hex::decode(rest).map_err(|_| bad("not hex"))?,
                _ => {
                    return Err(bad(
                        "expected 52 nixbase32 or 64 hex characters after sha256:",
                    ))
                }
            }
        } else if let Some(rest) = s.strip_prefix("sha256-") {
            base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| bad("not base64 after sha256-"))?
        } else {
            return Err(bad("only sha256 hashes are supported (sha256:<nixbase32>)"));
        };
        let hash: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("a SHA-256 hash has 32 bytes"))?;
        Ok(NixHash(hash))
    }

    /// The hash alone in nixbase32 (52 characters), as NAR file names carry it.
    pub fn base32(&self) -> String {
        nixbase32::encode(&self.0)
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// `sha256:<nixbase32>`, Nix's own spelling in narinfo files and fingerprints.
impl std::fmt::Display for NixHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.base32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_spellings_one_hash() {
        let h = NixHash::of(b"hello");
        let b32 = h.to_string();
        let hx = format!("sha256:{}", h.hex());
        let sri = format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(h.0)
        );
        for s in [&b32, &hx, &sri] {
            assert_eq!(NixHash::parse(s).unwrap(), h, "{s}");
        }
        assert!(NixHash::parse("md5:abc").is_err());
        assert!(NixHash::parse("sha256:abc").is_err());
        assert!(NixHash::parse("sha256-AAAA").is_err());
    }
}
