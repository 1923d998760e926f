//! SHA-256 digests as REAPI names them: a lowercase hex hash plus a size.

use std::fmt;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use sha2::{Digest as _, Sha256};

use crate::error::{Result, StoreError as Error};

/// SHA-256 of the empty string. The empty blob always exists and is never stored.
pub const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub hash: [u8; 32],
    pub size: u64,
}

impl Digest {
    pub const EMPTY: Digest = Digest {
        hash: EMPTY_SHA256,
        size: 0,
    };

    pub fn of(data: &[u8]) -> Digest {
        Digest {
            hash: Sha256::digest(data).into(),
            size: data.len() as u64,
        }
    }

    /// The digest of everything `r` yields, read a buffer at a time (never whole into
    /// memory). Blocking when `r` is.
    pub fn of_reader(mut r: impl std::io::Read) -> std::io::Result<Digest> {
        let mut h = Sha256::new();
        let size = std::io::copy(&mut r, &mut h)?;
        Ok(Digest {
            hash: h.finalize().into(),
            size,
        })
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && self.hash == EMPTY_SHA256
    }

    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// Parses a hash as it appears in resource names and URLs: exactly 64 lowercase hex digits.
    pub fn parse_hash(s: &str) -> Result<[u8; 32]> {
        if s.len() != 64 {
            return Err(Error::InvalidArgument(format!(
                "hash {s:?} has {} characters; a SHA-256 hash has 64",
                s.len()
            )));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::InvalidArgument(format!(
                "hash {s:?} is not lowercase hexadecimal"
            )));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| Error::InvalidArgument(format!("hash {s:?}: {e}")))?;
        Ok(out)
    }

    pub fn parse(hash: &str, size: &str) -> Result<Digest> {
        let hash = Self::parse_hash(hash)?;
        let size: i64 = size
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("size {size:?} is not an integer")))?;
        Self::from_parts(hash, size)
    }

    fn from_parts(hash: [u8; 32], size: i64) -> Result<Digest> {
        if size < 0 {
            return Err(Error::InvalidArgument(format!("negative size {size}")));
        }
        Ok(Digest {
            hash,
            size: size as u64,
        })
    }

    pub fn from_proto(d: &re::Digest) -> Result<Digest> {
        Self::from_parts(Self::parse_hash(&d.hash)?, d.size_bytes)
    }

    /// For optional proto fields: absent means "no digest", not an error.
    pub fn from_opt_proto(d: &Option<re::Digest>) -> Result<Option<Digest>> {
        d.as_ref().map(Self::from_proto).transpose()
    }

    pub fn to_proto(&self) -> re::Digest {
        re::Digest {
            hash: self.hex(),
            size_bytes: self.size as i64,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// REAPI 2.3 lets requests name their digest function; we speak only SHA-256.
pub fn check_digest_function(value: i32) -> Result<()> {
    use re::digest_function::Value;
    if value == Value::Unknown as i32 || value == Value::Sha256 as i32 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "digest function {value} is not supported; this server uses SHA256 only"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_constant_is_sha256_of_nothing() {
        assert_eq!(Digest::of(b""), Digest::EMPTY);
        assert!(Digest::EMPTY.is_empty_blob());
    }

    #[test]
    fn of_reader_agrees_with_of() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(Digest::of_reader(&data[..]).unwrap(), Digest::of(&data));
        assert_eq!(Digest::of_reader(&b""[..]).unwrap(), Digest::EMPTY);
    }

    #[test]
    fn rejects_malformed_hashes_and_sizes() {
        let good = "a".repeat(64);
        assert!(Digest::parse(&good, "3").is_ok());
        assert!(matches!(
            Digest::parse(&"a".repeat(63), "3"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Digest::parse(&"g".repeat(64), "3"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Digest::parse(&"A".repeat(64), "3"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Digest::parse(&good, "-1"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Digest::parse(&good, "x"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
