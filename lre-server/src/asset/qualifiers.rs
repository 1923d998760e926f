//! Request qualifiers. Supported: `checksum.sri` (verified), `bazel.canonical_id` (only
//! tells otherwise equal requests apart), `http_header:NAME` and `http_header_url:INDEX:NAME`
//! (sent upstream). Anything else is refused with INVALID_ARGUMENT and a BadRequest detail,
//! as the spec asks of a server that cannot honour a qualifier.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use bazel_remote_apis::build::bazel::remote::asset::v1::Qualifier;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::error::Error;

pub const CHECKSUM_SRI: &str = "checksum.sri";
pub const CANONICAL_ID: &str = "bazel.canonical_id";
const HTTP_HEADER: &str = "http_header:";
const HTTP_HEADER_URL: &str = "http_header_url:";
/// Qualifiers one request may carry.
pub const MAX_QUALIFIERS: usize = 256;
/// Unsupported qualifiers named in an error, at most.
const NAMED_UNSUPPORTED: usize = 10;
/// Longest qualifier name echoed in an error.
const NAME_IN_MESSAGE: usize = 128;

/// A qualifier name as errors quote it: client input, so cut short.
fn quoted(name: &str) -> String {
    format!("{:?}", super::clip(name, NAME_IN_MESSAGE))
}

/// Credentials are not forwarded: what is downloaded lands in a cache that every reader of
/// the instance shares, so content behind a login would be handed to everyone.
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie", "cookie2"];
/// Framing, connection and content-coding headers belong to the server's HTTP client: with
/// them a response would no longer be the plain, whole resource the checksum describes.
const CLIENT_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "expect",
    "range",
    "if-range",
    "accept-encoding",
];

/// Standard base64 as SRI writes it; missing padding is forgiven.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, Default)]
pub struct Qualifiers {
    pub sri: Option<Sri>,
    canonical_id: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    url_headers: Vec<(usize, HeaderName, HeaderValue)>,
}

impl Qualifiers {
    /// Parses the qualifiers of a request naming `uris` URIs.
    pub fn parse(qs: &[Qualifier], uris: usize) -> Result<Qualifiers, Status> {
        if qs.len() > MAX_QUALIFIERS {
            return Err(invalid(format!(
                "{} qualifiers given; at most {MAX_QUALIFIERS} are accepted",
                qs.len()
            )));
        }
        let mut out = Qualifiers::default();
        let mut seen = std::collections::HashSet::new();
        let mut unsupported = Vec::new();
        for q in qs {
            if !seen.insert(q.name.as_str()) {
                return Err(invalid(format!(
                    "qualifier {} is given twice",
                    quoted(&q.name)
                )));
            }
            if q.name == CHECKSUM_SRI {
                let sri = Sri::parse(&q.value)
                    .map_err(|m| invalid(format!("qualifier {CHECKSUM_SRI}: {m}")))?;
                out.sri = Some(sri);
            } else if q.name == CANONICAL_ID {
                out.canonical_id = Some(q.value.clone());
            } else if let Some(rest) = q.name.strip_prefix(HTTP_HEADER_URL) {
                let (index, name) = rest
                    .split_once(':')
                    .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n)))
                    .ok_or_else(|| {
                        invalid(format!(
                            "qualifier {}: expected {HTTP_HEADER_URL}INDEX:NAME",
                            quoted(&q.name)
                        ))
                    })?;
                if index >= uris {
                    return Err(invalid(format!(
                        "qualifier {}: the request has only {uris} URI(s)",
                        quoted(&q.name)
                    )));
                }
                let (n, v) = header(&q.name, name, &q.value)?;
                out.url_headers.push((index, n, v));
            } else if let Some(name) = q.name.strip_prefix(HTTP_HEADER) {
                out.headers.push(header(&q.name, name, &q.value)?);
            } else {
                unsupported.push(q.name.clone());
            }
        }
        if unsupported.is_empty() {
            return Ok(out);
        }
        let named: Vec<String> = unsupported
            .iter()
            .take(NAMED_UNSUPPORTED)
            .map(|n| quoted(n))
            .collect();
        let violations: Vec<FieldViolation> = named
            .iter()
            .map(|n| FieldViolation::new("qualifiers.name", format!("{n} not supported")))
            .collect();
        let more = match unsupported.len() - named.len() {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        Err(Status::with_error_details(
            Code::InvalidArgument,
            format!(
                "unsupported qualifier(s) {}{more}; this server supports {CHECKSUM_SRI}, {CANONICAL_ID}, {HTTP_HEADER}NAME and {HTTP_HEADER_URL}INDEX:NAME",
                named.join(", ")
            ),
            ErrorDetails::with_bad_request(violations),
        ))
    }

    /// The headers sent with URI number `index`: its own `http_header_url` ones replace
    /// generic `http_header` ones of the same name.
    pub fn headers_for(&self, index: usize) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in &self.headers {
            map.insert(n.clone(), v.clone());
        }
        for (_, n, v) in self.url_headers.iter().filter(|(i, _, _)| *i == index) {
            map.insert(n.clone(), v.clone());
        }
        map
    }

    /// What, besides its URI, tells the content of URI number `index` apart: every
    /// qualifier but the checksum (which is checked against the content instead), sorted.
    pub fn key_parts(&self, index: usize) -> Vec<(String, String)> {
        let mut parts: Vec<(String, String)> = self
            .headers_for(index)
            .iter()
            .map(|(n, v)| {
                (
                    format!("{HTTP_HEADER}{n}"),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        if let Some(id) = &self.canonical_id {
            parts.push((CANONICAL_ID.into(), id.clone()));
        }
        parts.sort();
        parts
    }
}

/// The qualifiers for a log line; header values may be secrets, so only their names.
pub fn describe(qs: &[Qualifier]) -> Vec<String> {
    qs.iter()
        .map(|q| match q.name.as_str() {
            CHECKSUM_SRI | CANONICAL_ID => format!("{}={}", q.name, q.value),
            _ => format!("{}=<{} bytes>", q.name, q.value.len()),
        })
        .collect()
}

fn invalid(m: String) -> Status {
    Error::InvalidArgument(m).into()
}

fn header(qualifier: &str, name: &str, value: &str) -> Result<(HeaderName, HeaderValue), Status> {
    let qualifier = quoted(qualifier);
    let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        invalid(format!(
            "qualifier {qualifier}: {} is not a header name",
            quoted(name)
        ))
    })?;
    if CREDENTIAL_HEADERS.contains(&n.as_str()) {
        return Err(invalid(format!(
            "qualifier {qualifier}: credentials are not forwarded upstream (downloads land in a cache every reader shares)"
        )));
    }
    if CLIENT_HEADERS.contains(&n.as_str()) || n.as_str().starts_with("proxy-") {
        return Err(invalid(format!(
            "qualifier {qualifier}: the server's HTTP client sets this header itself"
        )));
    }
    let v = HeaderValue::from_str(value).map_err(|_| {
        invalid(format!(
            "qualifier {qualifier}: the value is not a valid header value"
        ))
    })?;
    Ok((n, v))
}

/// The SRI token of a SHA-256 hash (a blob's CAS hash).
pub fn sha256_token(hash: &[u8; 32]) -> String {
    SriHash {
        algo: Algo::Sha256,
        digest: hash.to_vec(),
    }
    .token()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Sha256,
    Sha384,
    Sha512,
}

impl Algo {
    fn parse(s: &str) -> Option<Algo> {
        match s.to_ascii_lowercase().as_str() {
            "sha256" => Some(Algo::Sha256),
            "sha384" => Some(Algo::Sha384),
            "sha512" => Some(Algo::Sha512),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Algo::Sha256 => "sha256",
            Algo::Sha384 => "sha384",
            Algo::Sha512 => "sha512",
        }
    }

    fn len(self) -> usize {
        match self {
            Algo::Sha256 => 32,
            Algo::Sha384 => 48,
            Algo::Sha512 => 64,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SriHash {
    pub algo: Algo,
    pub digest: Vec<u8>,
}

impl SriHash {
    /// The canonical "alg-BASE64" form, as entries remember verified hashes.
    pub fn token(&self) -> String {
        format!("{}-{}", self.algo.name(), B64.encode(&self.digest))
    }
}

/// A Subresource Integrity value: one or more space-separated "alg-BASE64" hashes. Unknown
/// algorithms are skipped, as SRI prescribes, but at least one known one is required, and
/// every known one must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sri {
    pub hashes: Vec<SriHash>,
}

impl Sri {
    pub fn parse(s: &str) -> Result<Sri, String> {
        let mut hashes = Vec::new();
        // Client input: quoted cut short.
        let q = |t: &str| format!("{:?}", super::clip(t, NAME_IN_MESSAGE));
        for token in s.split_ascii_whitespace() {
            // SRI allows "?options" after the hash; none are defined.
            let token = token.split('?').next().unwrap_or(token);
            let Some((alg, b64)) = token.split_once('-') else {
                return Err(format!("{} is not of the form sha256-BASE64", q(token)));
            };
            let Some(algo) = Algo::parse(alg) else {
                continue;
            };
            let digest = B64
                .decode(b64)
                .map_err(|e| format!("{}: the hash is not base64: {e}", q(token)))?;
            if digest.len() != algo.len() {
                return Err(format!(
                    "{}: a {} hash has {} bytes, not {}",
                    q(token),
                    algo.name(),
                    algo.len(),
                    digest.len()
                ));
            }
            hashes.push(SriHash { algo, digest });
        }
        if hashes.is_empty() {
            return Err(format!("{} has no sha256, sha384 or sha512 hash", q(s)));
        }
        Ok(Sri { hashes })
    }

    /// The SHA-256 it names, which for a blob is its CAS hash.
    pub fn sha256(&self) -> Option<[u8; 32]> {
        self.hashes
            .iter()
            .find(|h| h.algo == Algo::Sha256)
            .and_then(|h| h.digest.as_slice().try_into().ok())
    }

    pub fn verify(&self, actual: &Hashes) -> Result<(), String> {
        for want in &self.hashes {
            match actual.get(want.algo) {
                Some(got) if got == want.digest.as_slice() => {}
                got => {
                    let got = got.map_or("nothing".to_string(), |g| {
                        SriHash {
                            algo: want.algo,
                            digest: g.to_vec(),
                        }
                        .token()
                    });
                    return Err(format!(
                        "checksum mismatch: checksum.sri wants {}, the content has {got}",
                        want.token()
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn tokens(&self) -> Vec<String> {
        self.hashes.iter().map(SriHash::token).collect()
    }
}

/// SHA-256 always (the CAS key), plus whatever else an SRI asks for, in one pass.
pub struct Hasher {
    sha256: Sha256,
    sha384: Option<Sha384>,
    sha512: Option<Sha512>,
}

impl Hasher {
    pub fn new(sri: Option<&Sri>) -> Hasher {
        let wants = |a| sri.is_some_and(|s| s.hashes.iter().any(|h| h.algo == a));
        Hasher {
            sha256: Sha256::new(),
            sha384: wants(Algo::Sha384).then(Sha384::new),
            sha512: wants(Algo::Sha512).then(Sha512::new),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.sha256.update(data);
        if let Some(h) = &mut self.sha384 {
            h.update(data);
        }
        if let Some(h) = &mut self.sha512 {
            h.update(data);
        }
    }

    pub fn finish(self) -> Hashes {
        let mut others = Vec::new();
        if let Some(h) = self.sha384 {
            others.push(SriHash {
                algo: Algo::Sha384,
                digest: h.finalize().to_vec(),
            });
        }
        if let Some(h) = self.sha512 {
            others.push(SriHash {
                algo: Algo::Sha512,
                digest: h.finalize().to_vec(),
            });
        }
        Hashes {
            sha256: self.sha256.finalize().into(),
            others,
        }
    }
}

pub struct Hashes {
    pub sha256: [u8; 32],
    pub others: Vec<SriHash>,
}

impl Hashes {
    pub fn get(&self, algo: Algo) -> Option<&[u8]> {
        if algo == Algo::Sha256 {
            return Some(&self.sha256);
        }
        self.others
            .iter()
            .find(|h| h.algo == algo)
            .map(|h| h.digest.as_slice())
    }

    /// Every hash computed, as SRI tokens.
    pub fn tokens(&self) -> Vec<String> {
        let mut out = vec![SriHash {
            algo: Algo::Sha256,
            digest: self.sha256.to_vec(),
        }
        .token()];
        out.extend(self.others.iter().map(SriHash::token));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC256: &str = "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";
    const ABC384: &str = "sha384-ywB1P0WjXou1oD1pmsZQBycsMqsO3tFjGotgWkP/W+2AhgcroefMI1i67KE0yCWn";
    const ABC512: &str = "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw==";

    fn hashes_of(data: &[u8], sri: &Sri) -> Hashes {
        let mut h = Hasher::new(Some(sri));
        h.update(data);
        h.finish()
    }

    #[test]
    fn sri_forms_parse_and_verify() {
        let s = Sri::parse(ABC256).unwrap();
        assert_eq!(
            s.sha256().map(hex::encode).unwrap(),
            crate::digest::Digest::of(b"abc").hex()
        );
        assert!(s.verify(&hashes_of(b"abc", &s)).is_ok());
        let e = s.verify(&hashes_of(b"abd", &s)).unwrap_err();
        assert!(e.contains("checksum mismatch") && e.contains(ABC256), "{e}");
        // Unpadded base64 is accepted; the canonical token is padded.
        let s = Sri::parse(ABC256.trim_end_matches('=')).unwrap();
        assert_eq!(s.tokens(), vec![ABC256.to_string()]);
        for one in [ABC384, ABC512] {
            let s = Sri::parse(one).unwrap();
            assert!(s.verify(&hashes_of(b"abc", &s)).is_ok(), "{one}");
            assert!(s.verify(&hashes_of(b"abcd", &s)).is_err(), "{one}");
            assert_eq!(s.sha256(), None);
        }
    }

    #[test]
    fn several_hashes_must_all_match_and_unknown_ones_are_skipped() {
        let both = Sri::parse(&format!("{ABC256}  {ABC512}?opt md5-xyz")).unwrap();
        assert_eq!(both.hashes.len(), 2);
        assert!(both.verify(&hashes_of(b"abc", &both)).is_ok());
        let other512 = Sri::parse(&format!("{ABC256} sha512-{}", B64.encode([7u8; 64]))).unwrap();
        assert!(other512.verify(&hashes_of(b"abc", &other512)).is_err());
        assert!(Sri::parse("md5-AAAA").unwrap_err().contains("no sha256"));
        assert!(Sri::parse("").is_err());
        assert!(Sri::parse("sha256-%%%").unwrap_err().contains("base64"));
        assert!(Sri::parse("sha256-AAAA").unwrap_err().contains("32 bytes"));
        assert!(Sri::parse("sha256").unwrap_err().contains("form"));
        let junk = "md5-x ".repeat(20_000);
        assert!(Sri::parse(&junk).unwrap_err().len() < 500);
        assert_eq!(
            Hasher::new(None).finish().tokens(),
            vec!["sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_string()]
        );
    }

    fn q(name: &str, value: &str) -> Qualifier {
        Qualifier {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn qualifiers_parse_headers_and_key_parts() {
        let qs = [
            q(CANONICAL_ID, "abc"),
            q(CHECKSUM_SRI, ABC256),
            q("http_header:Accept", "application/gzip"),
            q("http_header_url:1:accept", "*/*"),
            q("http_header:X-Mirror", "eu"),
        ];
        let p = Qualifiers::parse(&qs, 2).unwrap();
        assert!(p.sri.is_some());
        assert_eq!(p.headers_for(0)["accept"], "application/gzip");
        assert_eq!(p.headers_for(1)["accept"], "*/*");
        assert_eq!(p.headers_for(1)["x-mirror"], "eu");
        // The checksum is no part of the key; the canonical id and headers are.
        assert_eq!(
            p.key_parts(0),
            vec![
                (CANONICAL_ID.to_string(), "abc".to_string()),
                (
                    "http_header:accept".to_string(),
                    "application/gzip".to_string()
                ),
                ("http_header:x-mirror".to_string(), "eu".to_string()),
            ]
        );
        assert_ne!(p.key_parts(0), p.key_parts(1));
    }

    #[test]
    fn bad_qualifiers_are_invalid_arguments() {
        let code = |qs: &[Qualifier]| Qualifiers::parse(qs, 1).unwrap_err();
        let e = code(&[q("resource_type", "x"), q("vcs.commit", "y")][..]);
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("resource_type") && e.message().contains("vcs.commit"));
        let bad = e.get_details_bad_request().expect("BadRequest detail");
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[0].field, "qualifiers.name");
        assert_eq!(
            bad.field_violations[0].description,
            "\"resource_type\" not supported"
        );
        for qs in [
            vec![q(CANONICAL_ID, "a"), q(CANONICAL_ID, "b")],
            vec![q(CHECKSUM_SRI, "sha1-AAAA")],
            vec![q("http_header:Authorization", "Bearer x")],
            vec![q("http_header:cookie", "a=b")],
            vec![q("http_header:Host", "evil")],
            vec![q("http_header:Proxy-Foo", "1")],
            vec![q("http_header:X", "a\nb")],
            vec![q("http_header:bad name", "1")],
            vec![q("http_header_url:1:accept", "*/*")],
            vec![q("http_header_url:x:accept", "*/*")],
        ] {
            let e = code(&qs[..]);
            assert_eq!(e.code(), Code::InvalidArgument, "{qs:?}");
            assert!(
                e.message().contains(&qs[qs.len() - 1].name),
                "{qs:?}: {}",
                e.message()
            );
        }
    }

    #[test]
    fn huge_or_many_qualifiers_are_not_echoed_whole() {
        let long = format!("x-{}", "n".repeat(50_000));
        let many: Vec<Qualifier> = (0..50).map(|i| q(&format!("{long}{i}"), "v")).collect();
        let e = Qualifiers::parse(&many, 1).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().len() < 4000, "{} bytes", e.message().len());
        assert!(e.message().contains("and 40 more"), "{}", e.message());
        let bad = e.get_details_bad_request().expect("BadRequest detail");
        assert_eq!(bad.field_violations.len(), 10);
        for qs in [
            vec![q(&long, "a"), q(&long, "b")],
            vec![q(&format!("http_header_url:{long}"), "a")],
            vec![q(&format!("http_header:{long} x"), "a")],
        ] {
            let e = Qualifiers::parse(&qs, 1).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().len() < 1000, "{} bytes", e.message().len());
        }
        let too_many: Vec<Qualifier> = (0..=MAX_QUALIFIERS)
            .map(|i| q(&format!("http_header:x-{i}"), "v"))
            .collect();
        let e = Qualifiers::parse(&too_many, 1).unwrap_err();
        assert!(e.message().contains("at most 256"), "{}", e.message());
    }
}
