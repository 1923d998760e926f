//! Digests as REAPI names them: a lowercase hex hash plus a size, under one of the two
//! digest functions this server speaks, SHA-256 (the default) and BLAKE3 (REAPI 2.3's
//! `digest_function`, Bazel's `--digest_function=blake3`).
//!
//! The function is part of the digest: two digests of the same bytes under different
//! functions are different digests (they differ in `Eq`, `Hash` and in the store key), so
//! the two namespaces never mix. Both hashes are 32 bytes, so a hash alone never says which
//! function made it: every digest parsed from a request takes the request's function.

use std::fmt;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use sha2::{Digest as _, Sha256};

use crate::error::{Result, StoreError as Error};

/// SHA-256 of the empty string. The empty blob always exists and is never stored.
pub const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// BLAKE3 of the empty string.
pub const EMPTY_BLAKE3: [u8; 32] = [
    0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc, 0xc9, 0x49,
    0x9b, 0xcb, 0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca, 0xe4, 0x1f, 0x32, 0x62,
];

/// The digest functions this server speaks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub enum DigestFunction {
    #[default]
    Sha256,
    Blake3,
}

impl DigestFunction {
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// The function a request names in its `digest_function` field. Unset means SHA-256:
    /// REAPI infers the function from the hash length, and both are 64 hex digits long, so
    /// a client that speaks BLAKE3 must say so.
    pub fn from_request(value: i32) -> Result<DigestFunction> {
        use re::digest_function::Value;
        match Value::try_from(value) {
            Ok(Value::Unknown | Value::Sha256) => Ok(DigestFunction::Sha256),
            Ok(Value::Blake3) => Ok(DigestFunction::Blake3),
            Ok(other) => Err(Error::InvalidArgument(format!(
                "digest function {} is not supported; this server speaks SHA256 and BLAKE3",
                other.as_str_name()
            ))),
            Err(_) => Err(Error::InvalidArgument(format!(
                "digest function {value} is unknown; this server speaks SHA256 and BLAKE3"
            ))),
        }
    }

    /// The REAPI enum value.
    pub fn to_proto(self) -> i32 {
        use re::digest_function::Value;
        match self {
            DigestFunction::Sha256 => Value::Sha256 as i32,
            DigestFunction::Blake3 => Value::Blake3 as i32,
        }
    }

    /// The lowercase name resource names and URLs use (`blobs/blake3/{hash}/{size}`).
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    /// The function a resource-name or URL segment names, if it names one.
    pub fn from_name(name: &str) -> Option<DigestFunction> {
        DigestFunction::ALL.into_iter().find(|f| f.name() == name)
    }

    /// `from_name`, or the one message every name-taking surface (resource names, HTTP
    /// paths and headers, query parameters) refuses an unknown name with; the caller adds
    /// where the name came from. A hostile name is quoted by its first 64 characters only.
    pub fn parse_name(name: &str) -> std::result::Result<DigestFunction, String> {
        Self::from_name(name).ok_or_else(|| {
            format!(
                "digest function {:?} is not supported; this server speaks sha256 and blake3",
                name.chars().take(64).collect::<String>()
            )
        })
    }

    pub fn empty_hash(self) -> [u8; 32] {
        match self {
            DigestFunction::Sha256 => EMPTY_SHA256,
            DigestFunction::Blake3 => EMPTY_BLAKE3,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher::Sha256(Sha256::new()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    pub fn hash(self, data: &[u8]) -> [u8; 32] {
        let mut h = self.hasher();
        h.update(data);
        h.finalize()
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An incremental hash under one digest function. (BLAKE3's state is boxed: it is about
/// 2 KB, SHA-256's about 100 bytes.)
#[derive(Clone)]
pub enum Hasher {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn finalize(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(h) => h.finalize().into(),
            Hasher::Blake3(h) => h.finalize().into(),
        }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub function: DigestFunction,
    pub hash: [u8; 32],
    pub size: u64,
}

impl Digest {
    /// The empty blob under SHA-256.
    pub const EMPTY: Digest = Digest {
        function: DigestFunction::Sha256,
        hash: EMPTY_SHA256,
        size: 0,
    };

    /// The SHA-256 digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Self::of_in(DigestFunction::Sha256, data)
    }

    pub fn of_in(function: DigestFunction, data: &[u8]) -> Digest {
        Digest {
            function,
            hash: function.hash(data),
            size: data.len() as u64,
        }
    }

    /// The SHA-256 digest of everything `r` yields, read a buffer at a time (never whole
    /// into memory). Blocking when `r` is.
    pub fn of_reader(r: impl std::io::Read) -> std::io::Result<Digest> {
        Self::of_reader_in(DigestFunction::Sha256, r)
    }

    pub fn of_reader_in(
        function: DigestFunction,
        mut r: impl std::io::Read,
    ) -> std::io::Result<Digest> {
        let mut h = function.hasher();
        let size = std::io::copy(&mut r, &mut h)?;
        Ok(Digest {
            function,
            hash: h.finalize(),
            size,
        })
    }

    /// The empty blob under `function`.
    pub fn empty(function: DigestFunction) -> Digest {
        Digest {
            function,
            hash: function.empty_hash(),
            size: 0,
        }
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && self.hash == self.function.empty_hash()
    }

    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// Parses a hash as it appears in resource names and URLs: exactly 64 lowercase hex digits.
    pub fn parse_hash(s: &str) -> Result<[u8; 32]> {
        if s.len() != 64 {
            return Err(Error::InvalidArgument(format!(
                "hash {s:?} has {} characters; a SHA-256 or BLAKE3 hash has 64",
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

    pub fn parse(function: DigestFunction, hash: &str, size: &str) -> Result<Digest> {
        let hash = Self::parse_hash(hash)?;
        let size: i64 = size
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("size {size:?} is not an integer")))?;
        Self::from_parts(function, hash, size)
    }

    fn from_parts(function: DigestFunction, hash: [u8; 32], size: i64) -> Result<Digest> {
        if size < 0 {
            return Err(Error::InvalidArgument(format!("negative size {size}")));
        }
        Ok(Digest {
            function,
            hash,
            size: size as u64,
        })
    }

    /// A digest from a message of a request made under `function`.
    pub fn from_proto(function: DigestFunction, d: &re::Digest) -> Result<Digest> {
        Self::from_parts(function, Self::parse_hash(&d.hash)?, d.size_bytes)
    }

    /// For optional proto fields: absent means "no digest", not an error.
    pub fn from_opt_proto(
        function: DigestFunction,
        d: &Option<re::Digest>,
    ) -> Result<Option<Digest>> {
        d.as_ref()
            .map(|d| Self::from_proto(function, d))
            .transpose()
    }

    /// The proto form. The function is not in it: the request or response that carries it
    /// says which (`digest_function`).
    pub fn to_proto(&self) -> re::Digest {
        re::Digest {
            hash: self.hex(),
            size_bytes: self.size as i64,
        }
    }

    /// This digest's hash and size under another function's name: for hashes computed
    /// elsewhere of the same bytes, never to relabel a hash.
    pub fn with_function(self, function: DigestFunction) -> Digest {
        Digest { function, ..self }
    }
}

impl fmt::Display for Digest {
    /// `HEX/SIZE` for SHA-256 (as logs always showed it), `blake3:HEX/SIZE` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.function {
            DigestFunction::Sha256 => write!(f, "{}/{}", self.hex(), self.size),
            other => write!(f, "{other}:{}/{}", self.hex(), self.size),
        }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// For the services that speak only SHA-256 (remote execution, Remote Asset): the
/// request's function, refused unless it is SHA-256, saying which service refused.
pub fn require_sha256(value: i32, service: &str) -> Result<()> {
    match DigestFunction::from_request(value)? {
        DigestFunction::Sha256 => Ok(()),
        other => Err(Error::InvalidArgument(format!(
            "{service} speaks SHA256 only, not {}; this server's cache speaks both (see \
             GetCapabilities: execution_capabilities.digest_functions)",
            other.name().to_uppercase()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_constants_are_the_hashes_of_nothing() {
        assert_eq!(Digest::of(b""), Digest::EMPTY);
        assert_eq!(EMPTY_BLAKE3, *blake3::hash(b"").as_bytes());
        assert!(Digest::EMPTY.is_empty_blob());
    }

    #[test]
    fn of_reader_agrees_with_of() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(Digest::of_reader(&data[..]).unwrap(), Digest::of(&data));
        assert_eq!(Digest::of_reader(&b""[..]).unwrap(), Digest::EMPTY);
        let b3 = Digest::of_reader_in(DigestFunction::Blake3, &data[..]).unwrap();
        assert_eq!(b3, Digest::of_in(DigestFunction::Blake3, &data));
        assert_eq!(b3.hash, *blake3::hash(&data).as_bytes());
    }

    #[test]
    fn the_function_is_part_of_the_digest() {
        let s = Digest::of(b"x");
        let b = Digest::of_in(DigestFunction::Blake3, b"x");
        assert_ne!(s, b);
        // Same hash, different function: still different digests.
        assert_ne!(s, s.with_function(DigestFunction::Blake3));
        assert_eq!(
            Digest::empty(DigestFunction::Blake3),
            Digest::of_in(DigestFunction::Blake3, b"")
        );
        assert!(Digest::empty(DigestFunction::Blake3).is_empty_blob());
        assert!(!Digest::EMPTY
            .with_function(DigestFunction::Blake3)
            .is_empty_blob());
        assert_eq!(format!("{b}"), format!("blake3:{}/1", b.hex()));
    }

    #[test]
    fn requests_name_their_function() {
        use re::digest_function::Value;
        assert_eq!(
            DigestFunction::from_request(0).unwrap(),
            DigestFunction::Sha256
        );
        assert_eq!(
            DigestFunction::from_request(Value::Sha256 as i32).unwrap(),
            DigestFunction::Sha256
        );
        assert_eq!(
            DigestFunction::from_request(Value::Blake3 as i32).unwrap(),
            DigestFunction::Blake3
        );
        let e = DigestFunction::from_request(Value::Sha1 as i32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHA1") && e.contains("BLAKE3"), "{e}");
        assert!(DigestFunction::from_request(999).is_err());
        assert!(require_sha256(Value::Blake3 as i32, "remote execution")
            .unwrap_err()
            .to_string()
            .contains("remote execution"));
        for f in DigestFunction::ALL {
            assert_eq!(DigestFunction::from_request(f.to_proto()).unwrap(), f);
            assert_eq!(DigestFunction::from_name(f.name()), Some(f));
        }
    }

    #[test]
    fn rejects_malformed_hashes_and_sizes() {
        let good = "a".repeat(64);
        assert!(Digest::parse(DigestFunction::Sha256, &good, "3").is_ok());
        assert!(matches!(
            Digest::parse(DigestFunction::Sha256, &"a".repeat(63), "3"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Digest::parse(DigestFunction::Sha256, &"g".repeat(64), "3"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Digest::parse(DigestFunction::Sha256, &"A".repeat(64), "3"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Digest::parse(DigestFunction::Sha256, &good, "-1"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Digest::parse(DigestFunction::Sha256, &good, "x"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
