//! Nix's signing keys and narinfo signatures: Ed25519 over a path's fingerprint
//! (`narinfo::NarInfo::fingerprint`), keys written `name:base64` (a public key is the
//! 32-byte point, a secret key the 64-byte seed + point, as `nix-store
//! --generate-binary-cache-key` writes them), signatures `name:base64(64 bytes)`.
//! Ed25519 is `ring`'s, deterministic, so a signature made here is byte-identical to
//! Nix's for the same key and fingerprint.

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};

use crate::error::{excerpt, FormatError};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn split_named(s: &str, what: &str) -> Result<(String, Vec<u8>), FormatError> {
    let (name, b64) = s.trim().split_once(':').ok_or_else(|| {
        FormatError::Signature(format!("{what} {} is not <name>:<base64>", excerpt(s)))
    })?;
    if name.is_empty() || name.len() > 256 {
        return Err(FormatError::Signature(format!(
            "{what} {}: the name must be 1 to 256 characters",
            excerpt(s)
        )));
    }
    let bytes = B64.decode(b64).map_err(|_| {
        FormatError::Signature(format!("{what} {}: not base64 after the name", excerpt(s)))
    })?;
    Ok((name.to_string(), bytes))
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PublicKey {
    pub name: String,
    key: [u8; 32],
}

impl PublicKey {
    /// `name:base64(32 bytes)`, as in `trusted-public-keys`.
    pub fn parse(s: &str) -> Result<PublicKey, FormatError> {
        let (name, bytes) = split_named(s, "public key")?;
        let key = bytes.try_into().map_err(|_| {
            FormatError::Signature(format!(
                "public key {}: an Ed25519 public key has 32 bytes",
                excerpt(s)
            ))
        })?;
        Ok(PublicKey { name, key })
    }

    /// Whether `sig` is this key's signature of `fingerprint`.
    pub fn verifies(&self, fingerprint: &str, sig: &Signature) -> bool {
        sig.name == self.name
            && UnparsedPublicKey::new(&ED25519, self.key)
                .verify(fingerprint.as_bytes(), &sig.bytes)
                .is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key))
    }
}

pub struct SecretKey {
    pub name: String,
    pair: Ed25519KeyPair,
}

impl SecretKey {
    /// `name:base64(seed ‖ public key)`, as `nix-store --generate-binary-cache-key` writes.
    pub fn parse(s: &str) -> Result<SecretKey, FormatError> {
        let (name, bytes) = split_named(s, "secret key")?;
        if bytes.len() != 64 {
            return Err(FormatError::Signature(format!(
                "secret key named {name:?}: an Ed25519 secret key has 64 bytes"
            )));
        }
        let pair =
            Ed25519KeyPair::from_seed_and_public_key(&bytes[..32], &bytes[32..]).map_err(|_| {
                FormatError::Signature(format!(
                    "secret key named {name:?}: its public half does not match its seed"
                ))
            })?;
        Ok(SecretKey { name, pair })
    }

    pub fn public(&self) -> PublicKey {
        use ring::signature::KeyPair as _;
        PublicKey {
            name: self.name.clone(),
            key: self
                .pair
                .public_key()
                .as_ref()
                .try_into()
                .expect("an Ed25519 public key has 32 bytes"),
        }
    }

    pub fn sign(&self, fingerprint: &str) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.pair.sign(fingerprint.as_bytes()).as_ref().to_vec(),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Signature {
    pub name: String,
    bytes: Vec<u8>,
}

impl Signature {
    /// `name:base64(64 bytes)`, a narinfo `Sig:` value.
    pub fn parse(s: &str) -> Result<Signature, FormatError> {
        let (name, bytes) = split_named(s, "signature")?;
        if bytes.len() != 64 {
            return Err(FormatError::Signature(format!(
                "signature {}: an Ed25519 signature has 64 bytes",
                excerpt(s)
            )));
        }
        Ok(Signature { name, bytes })
    }
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(&self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_and_names_matter() {
        let seed = [5u8; 32];
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        use ring::signature::KeyPair as _;
        let mut sk = seed.to_vec();
        sk.extend_from_slice(pair.public_key().as_ref());
        let sk = SecretKey::parse(&format!("test-1:{}", B64.encode(&sk))).unwrap();
        let pk = PublicKey::parse(&sk.public().to_string()).unwrap();
        let sig = sk.sign("1;/nix/store/x;sha256:y;1;");
        let sig = Signature::parse(&sig.to_string()).unwrap();
        assert!(pk.verifies("1;/nix/store/x;sha256:y;1;", &sig));
        assert!(!pk.verifies("1;/nix/store/x;sha256:y;2;", &sig));
        let other_name = PublicKey::parse(&format!("test-2:{}", B64.encode(pk.key))).unwrap();
        assert!(!other_name.verifies("1;/nix/store/x;sha256:y;1;", &sig));
        assert!(PublicKey::parse("nocolon").is_err());
        assert!(PublicKey::parse("k:AAAA").is_err());
        assert!(Signature::parse("k:AAAA").is_err());
    }
}
