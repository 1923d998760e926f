//! What the action cache stores under a key: the ActionResult exactly as it is served, who
//! wrote it and when (`Provenance`), and every CAS blob it references (`references`),
//! decided once when the entry is written so that a read never decodes an output Tree.
//!
//! The stored form is `MAGIC` followed by a `Stored` protobuf. Entries written before this
//! format are a bare ActionResult; they still read (without provenance, and with
//! `references` unknown). The two cannot be confused: `MAGIC` starts with the byte 0x6c,
//! which as a protobuf key is an end-group of field 13, and no valid message starts so.
//!
//! Everything lives in the one stored value, so every store layer (filesystem, memory, S3,
//! Redis, fast-slow) carries it unchanged and a hit costs no extra lookup.

use bytes::Bytes;
use prost::Message;

use crate::digest::{Digest, DigestFunction};
use crate::error::{Result, StoreError as Error};

/// Marks the current stored form.
pub const MAGIC: &[u8; 8] = b"lre-ac1\n";

/// Distinct blobs one action result may reference (its outputs, stdout, stderr, each output
/// Tree and every file in it). Each costs a lookup on every read; a result naming more is
/// refused when written, naming this limit.
pub const MAX_REFERENCES: usize = 100_000;

/// One reference as stored: the 32-byte hash and the size, big-endian.
const REFERENCE_BYTES: usize = 40;

#[derive(Clone, PartialEq, Message)]
struct Stored {
    #[prost(bytes = "bytes", tag = "1")]
    result: Bytes,
    #[prost(message, optional, tag = "2")]
    provenance: Option<Provenance>,
    /// `REFERENCE_BYTES` per referenced blob, in no particular order, no duplicates.
    #[prost(bytes = "bytes", tag = "3")]
    references: Bytes,
    /// The REAPI `digest_function` the action and every reference are under; unset (0,
    /// entries from before BLAKE3) is SHA-256.
    #[prost(int32, tag = "4")]
    digest_function: i32,
}

/// Who wrote an action-cache entry, when, and for which instance and action.
#[derive(Clone, PartialEq, Eq, Message, serde::Serialize)]
pub struct Provenance {
    #[prost(string, tag = "1")]
    pub instance: String,
    /// The action's hash (under the entry's digest function), lowercase hex.
    #[prost(string, tag = "2")]
    pub action: String,
    /// Milliseconds since the Unix epoch, by the writing server's clock.
    #[prost(uint64, tag = "3")]
    pub written_at_ms: u64,
    /// "executed" (lre's scheduler stored what one of its workers ran) or "uploaded" (a
    /// client's UpdateActionResult or HTTP PUT).
    #[prost(string, tag = "4")]
    pub source: String,
    /// The worker that ran it (its id, bound to its token: "TOKEN/ID"); empty when uploaded.
    #[prost(string, tag = "5")]
    pub worker: String,
    /// The token behind the write: the worker's when executed, the client's when uploaded;
    /// empty for an anonymous client.
    #[prost(string, tag = "6")]
    pub token: String,
    /// The execution's operation name, when executed.
    #[prost(string, tag = "7")]
    pub operation: String,
}

pub const SOURCE_EXECUTED: &str = "executed";
pub const SOURCE_UPLOADED: &str = "uploaded";

impl Provenance {
    /// Whether `who` names this entry's writer: `token:NAME` (either source) or
    /// `worker:ID`.
    pub fn written_by(&self, who: &Writer) -> bool {
        match who {
            Writer::Token(t) => &self.token == t,
            Writer::Worker(w) => self.source == SOURCE_EXECUTED && &self.worker == w,
        }
    }

    /// A short human form: "worker W (token T)" or "token T" or "an anonymous client".
    pub fn who(&self) -> String {
        match (self.source.as_str(), self.token.is_empty()) {
            (SOURCE_EXECUTED, _) => format!("worker {} (token {})", self.worker, self.token),
            (_, true) => "an anonymous client".into(),
            (_, false) => format!("token {}", self.token),
        }
    }
}

/// A writer to look entries up by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Writer {
    Token(String),
    Worker(String),
}

impl std::str::FromStr for Writer {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Writer, String> {
        match s.split_once(':') {
            Some(("token", n)) if !n.is_empty() => Ok(Writer::Token(n.into())),
            Some(("worker", n)) if !n.is_empty() => Ok(Writer::Worker(n.into())),
            _ => Err(format!("{s:?} is neither token:NAME nor worker:ID")),
        }
    }
}

/// A decoded entry.
#[derive(Clone, Debug)]
pub struct AcEntry {
    /// The ActionResult's encoding, exactly as served.
    pub result: Bytes,
    pub provenance: Option<Provenance>,
    /// Every blob the result references, when the entry was written in the current form;
    /// `None` for an entry of the earlier form (its references must be found from the
    /// result itself).
    pub references: Option<Vec<Digest>>,
    /// The function the result's digests are under.
    pub function: DigestFunction,
}

impl AcEntry {
    /// Decodes a stored value. A bare ActionResult (the earlier form) comes back whole as
    /// `result`; whether it is a valid ActionResult is for the reader to find out.
    pub fn decode(raw: Bytes) -> Result<AcEntry> {
        let Some(body) = raw.strip_prefix(MAGIC.as_slice()) else {
            return Ok(AcEntry {
                result: raw,
                provenance: None,
                references: None,
                function: DigestFunction::Sha256,
            });
        };
        let s =
            Stored::decode(body).map_err(|e| Error::Corrupt(format!("action cache entry: {e}")))?;
        let function = DigestFunction::from_request(s.digest_function)
            .map_err(|e| Error::Corrupt(format!("action cache entry: {e}")))?;
        if s.references.len() % REFERENCE_BYTES != 0 {
            return Err(Error::Corrupt(format!(
                "action cache entry: a reference list of {} bytes is not a whole number of references",
                s.references.len()
            )));
        }
        let references = s
            .references
            .chunks_exact(REFERENCE_BYTES)
            .map(|c| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&c[..32]);
                let mut size = [0u8; 8];
                size.copy_from_slice(&c[32..]);
                Digest {
                    function,
                    hash,
                    size: u64::from_be_bytes(size),
                }
            })
            .collect();
        Ok(AcEntry {
            result: s.result,
            provenance: s.provenance,
            references: Some(references),
            function,
        })
    }

    /// The stored form of `result` (an encoded ActionResult, its digests under `function`)
    /// with its writer and the blobs it references (deduplicated here; the empty blob is
    /// left out, it always exists).
    pub fn encode(
        result: Bytes,
        provenance: Provenance,
        function: DigestFunction,
        references: &[Digest],
    ) -> Result<Bytes> {
        let mut seen = std::collections::HashSet::new();
        let mut packed = Vec::with_capacity(references.len().min(MAX_REFERENCES) * REFERENCE_BYTES);
        for d in references {
            if d.function != function {
                return Err(Error::Internal(format!(
                    "an action result under {function} references {d}"
                )));
            }
            if d.is_empty_blob() || !seen.insert(*d) {
                continue;
            }
            if seen.len() > MAX_REFERENCES {
                return Err(too_many_references());
            }
            packed.extend_from_slice(&d.hash);
            packed.extend_from_slice(&d.size.to_be_bytes());
        }
        let s = Stored {
            result,
            provenance: Some(provenance),
            references: packed.into(),
            // SHA-256 is left unset, as entries from before BLAKE3 have it.
            digest_function: match function {
                DigestFunction::Sha256 => 0,
                other => other.to_proto(),
            },
        };
        let mut out = Vec::with_capacity(MAGIC.len() + s.encoded_len());
        out.extend_from_slice(MAGIC);
        s.encode(&mut out)
            .map_err(|e| Error::Internal(format!("encoding an action cache entry: {e}")))?;
        Ok(out.into())
    }
}

pub fn too_many_references() -> Error {
    Error::InvalidArgument(format!(
        "the action result references more than {MAX_REFERENCES} distinct blobs (outputs, \
         stdout, stderr, output trees and the files in them); this server refuses to cache it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prov() -> Provenance {
        Provenance {
            instance: "main".into(),
            action: "ab".repeat(32),
            written_at_ms: 1_700_000_000_000,
            source: SOURCE_EXECUTED.into(),
            worker: "wk1/w1".into(),
            token: "wk1".into(),
            operation: "op".into(),
        }
    }

    #[test]
    fn an_entry_round_trips_with_deduplicated_references() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"bb");
        let raw = AcEntry::encode(
            Bytes::from_static(b"\x20\x01"),
            prov(),
            DigestFunction::Sha256,
            &[a, b, a, Digest::EMPTY],
        )
        .unwrap();
        assert!(raw.starts_with(MAGIC));
        let e = AcEntry::decode(raw).unwrap();
        assert_eq!(&e.result[..], b"\x20\x01");
        assert_eq!(e.provenance, Some(prov()));
        assert_eq!(e.references, Some(vec![a, b]));
        assert_eq!(e.function, DigestFunction::Sha256);
    }

    #[test]
    fn a_blake3_entry_keeps_its_function_and_refuses_a_sha256_reference() {
        let f = DigestFunction::Blake3;
        let a = Digest::of_in(f, b"a");
        let raw = AcEntry::encode(Bytes::new(), prov(), f, &[a, Digest::empty(f)]).unwrap();
        let e = AcEntry::decode(raw).unwrap();
        assert_eq!(e.function, f);
        assert_eq!(e.references, Some(vec![a]));
        let e = AcEntry::encode(Bytes::new(), prov(), f, &[Digest::of(b"a")]).unwrap_err();
        assert!(e.to_string().contains("references"), "{e}");
    }

    #[test]
    fn an_earlier_bare_result_reads_whole_without_provenance() {
        use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
        for r in [
            ActionResult::default(),
            ActionResult {
                exit_code: 3,
                stdout_raw: b"lre-ac1\n".to_vec(),
                ..Default::default()
            },
        ] {
            let raw = Bytes::from(r.encode_to_vec());
            let e = AcEntry::decode(raw.clone()).unwrap();
            assert_eq!(e.result, raw);
            assert!(e.provenance.is_none() && e.references.is_none());
        }
    }

    #[test]
    fn damaged_entries_and_too_many_references_are_errors() {
        let sha256 = DigestFunction::Sha256;
        let mut raw = AcEntry::encode(Bytes::new(), prov(), sha256, &[Digest::of(b"x")])
            .unwrap()
            .to_vec();
        raw.truncate(raw.len() - 3);
        assert!(matches!(
            AcEntry::decode(raw.into()),
            Err(Error::Corrupt(_))
        ));
        let many: Vec<Digest> = (0..=MAX_REFERENCES as u64)
            .map(|i| Digest {
                function: sha256,
                hash: [1; 32],
                size: i + 1,
            })
            .collect();
        let e = AcEntry::encode(Bytes::new(), prov(), sha256, &many).unwrap_err();
        assert!(e.to_string().contains(&MAX_REFERENCES.to_string()), "{e}");
    }

    #[test]
    fn writers_parse_and_match() {
        let p = prov();
        assert!(p.written_by(&"token:wk1".parse().unwrap()));
        assert!(p.written_by(&"worker:wk1/w1".parse().unwrap()));
        assert!(!p.written_by(&"token:ci".parse().unwrap()));
        let up = Provenance {
            source: SOURCE_UPLOADED.into(),
            worker: String::new(),
            token: "ci".into(),
            ..prov()
        };
        assert!(up.written_by(&Writer::Token("ci".into())));
        assert!(!up.written_by(&Writer::Worker(String::new())));
        assert!("nobody".parse::<Writer>().is_err());
        assert!("token:".parse::<Writer>().is_err());
    }
}
