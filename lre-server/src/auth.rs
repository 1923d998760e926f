//! Who may do what. A cache writer can poison every reader, so every write path asks
//! `authorize` before touching the store, and each scope grants only what its holder needs:
//!
//! | scope        | read | upload blobs | write action results | Execute | attach as worker | administer |
//! |--------------|------|--------------|----------------------|---------|------------------|------------|
//! | `read`       | yes  |              |                      |         |                  |            |
//! | `read-write` | yes  | yes          | yes                  | yes     |                  |            |
//! | `worker`     | yes  | yes          |                      |         | yes              |            |
//! | `admin`      | yes  |              |                      |         |                  | yes        |
//!
//! Administering is listing and purging what one token or worker wrote (a leaked token's
//! results), so it is a scope of its own, given to operators, never to a build.
//!
//! A worker uploads outputs (content-verified, so harmless) and reports results to the
//! scheduler, which writes them to the action cache of the job's instance only: a worker
//! never writes the action cache itself, and a client token never receives jobs.

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    None,
    Read,
    ReadWrite,
    /// Remote-execution workers: see the module's table.
    Worker,
    /// Operators: see the module's table.
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// CAS, action cache, capabilities, operations.
    Read,
    /// CAS uploads: verified against their digest, so they cannot poison anyone.
    Upload,
    /// Action-cache writes: trusted by every reader of the instance.
    Write,
    /// Execute and cancelling operations: results land in the action cache.
    Execute,
    /// Attach to the scheduler as a worker.
    Work,
    /// List and purge action-cache entries by who wrote them.
    Administer,
}

impl Scope {
    fn allows(self, access: Access) -> bool {
        use Access::*;
        match self {
            Scope::None => false,
            Scope::Read => access == Read,
            Scope::ReadWrite => matches!(access, Read | Upload | Write | Execute),
            Scope::Worker => matches!(access, Read | Upload | Work),
            Scope::Admin => matches!(access, Read | Administer),
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Scope::None),
            "read" => Ok(Scope::Read),
            "read-write" => Ok(Scope::ReadWrite),
            "worker" => Ok(Scope::Worker),
            "admin" => Ok(Scope::Admin),
            _ => Err(format!(
                "{s:?} is not one of none, read, read-write, worker, admin"
            )),
        }
    }
}

/// A token as configured: only its SHA-256 is stored, never the token itself.
/// Tokens are random secrets, not passwords, so a plain hash is the right tool here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    /// Lowercase hex SHA-256 of the token (`lre-server hash-token`).
    pub sha256: String,
    pub scope: Scope,
    /// Instances this token is limited to; absent means all.
    #[serde(default)]
    pub instances: Option<Vec<String>>,
    /// When the token stops working: an RFC 3339 time such as "2027-01-31T00:00:00Z".
    #[serde(default)]
    pub expires: Option<String>,
}

/// Parses a token's `expires` value.
pub fn parse_expiry(s: &str) -> std::result::Result<std::time::SystemTime, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(std::time::SystemTime::from)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time such as 2027-01-31T00:00:00Z: {e}"))
}

impl TokenConfig {
    /// A token entry for `secret`, valid for every instance and never expiring: what an
    /// embedding program (`lre up`, tests) configures for a secret it just made.
    pub fn for_secret(name: &str, secret: &str, scope: Scope) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            sha256: hex::encode(hash_token(secret)),
            scope,
            instances: None,
            expires: None,
        }
    }

    /// On failure returns the offending field and why.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.name.is_empty() || self.name.contains(':') {
            return Err((
                "name",
                "must be non-empty and contain no ':' (it is the basic-auth user name)".into(),
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(("sha256", "must be 64 hex digits: the SHA-256 of the token, not the token itself (see `lre-server hash-token`)".into()));
        }
        if self.scope == Scope::None {
            return Err((
                "scope",
                "a token must grant \"read\", \"read-write\", \"worker\" or \"admin\"".into(),
            ));
        }
        if let Some(e) = &self.expires {
            parse_expiry(e).map_err(|m| ("expires", m))?;
        }
        Ok(())
    }
}

struct Token {
    name: String,
    hash: [u8; 32],
    scope: Scope,
    instances: Option<Vec<String>>,
    expires: Option<std::time::SystemTime>,
}

/// Credentials as a request presents them.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential {
    Bearer(String),
    Basic { user: String, password: String },
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: Option<String>,
    scope: Scope,
    instances: Option<Vec<String>>,
    expires: Option<std::time::SystemTime>,
}

impl Principal {
    /// When the credential stops working, for sessions that outlive one request.
    pub fn expires(&self) -> Option<std::time::SystemTime> {
        self.expires
    }

    /// The instances this caller is limited to; `None` is all.
    pub fn instances(&self) -> Option<&[String]> {
        self.instances.as_deref()
    }

    pub fn may(&self, instance: &str, access: Access) -> bool {
        self.scope.allows(access)
            && self
                .instances
                .as_ref()
                .is_none_or(|list| list.iter().any(|i| i == instance))
    }

    fn who(&self) -> String {
        match &self.name {
            Some(n) => format!("token {n:?}"),
            None => "anonymous caller".into(),
        }
    }
}

pub struct Authenticator {
    anonymous: Scope,
    tokens: Vec<Token>,
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Authenticator {
    pub fn new(anonymous: Scope, tokens: &[TokenConfig]) -> Result<Self> {
        let tokens = tokens
            .iter()
            .map(|t| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(t.sha256.to_ascii_lowercase(), &mut hash).map_err(|e| {
                    Error::InvalidArgument(format!("token {:?}: sha256: {e}", t.name))
                })?;
                let expires = t
                    .expires
                    .as_deref()
                    .map(parse_expiry)
                    .transpose()
                    .map_err(|e| {
                        Error::InvalidArgument(format!("token {:?}: expires: {e}", t.name))
                    })?;
                Ok(Token {
                    name: t.name.clone(),
                    hash,
                    scope: t.scope,
                    instances: t.instances.clone(),
                    expires,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Authenticator { anonymous, tokens })
    }

    pub fn open() -> Self {
        Authenticator {
            anonymous: Scope::ReadWrite,
            tokens: vec![],
        }
    }

    /// Presented but unknown credentials are an error, never a silent fall-back to anonymous:
    /// a typo in a CI secret should fail loudly rather than quietly lose write access.
    pub fn authenticate(&self, cred: Option<Credential>) -> Result<Principal> {
        let (presented_user, secret) = match cred {
            None => {
                return Ok(Principal {
                    name: None,
                    scope: self.anonymous,
                    instances: None,
                    expires: None,
                })
            }
            Some(Credential::Bearer(t)) => (None, t),
            Some(Credential::Basic { user, password }) => (Some(user), password),
        };
        let presented = hash_token(&secret);
        // Compare against every token so timing does not reveal which one (or whether any) matched.
        let mut found: Option<&Token> = None;
        for t in &self.tokens {
            if bool::from(t.hash.ct_eq(&presented)) {
                found = Some(t);
            }
        }
        match found {
            Some(t) if t.expires.is_some_and(|e| e <= std::time::SystemTime::now()) => {
                Err(Error::Unauthenticated(format!(
                    "token {:?} has expired; ask for a new one",
                    t.name
                )))
            }
            Some(t) if presented_user.as_deref().is_none_or(|u| u == t.name) => Ok(Principal {
                name: Some(t.name.clone()),
                scope: t.scope,
                instances: t.instances.clone(),
                expires: t.expires,
            }),
            _ => Err(Error::Unauthenticated(
                "the presented token is not valid for this server".into(),
            )),
        }
    }

    /// Attaching as a worker is not an access to one instance: it takes the worker scope,
    /// and the token's `instances` then limit which jobs the worker receives.
    pub fn authorize_work(&self, p: &Principal) -> Result<()> {
        // A named token, always: the worker's id is bound to it.
        if p.name.is_some() && p.scope.allows(Access::Work) {
            return Ok(());
        }
        if p.name.is_none() && self.anonymous == Scope::None {
            return Err(Error::Unauthenticated(
                "this server requires a worker token (scope = \"worker\") to attach".into(),
            ));
        }
        Err(Error::PermissionDenied(format!(
            "{} may not attach as a worker (workers need a token with scope = \"worker\")",
            p.who()
        )))
    }

    /// Listing and purging entries by writer: an `admin` token, for every instance its
    /// token may read (`instances` still limits it).
    pub fn authorize_admin(&self, p: &Principal) -> Result<()> {
        if p.name.is_some() && p.scope.allows(Access::Administer) {
            return Ok(());
        }
        if p.name.is_none() && self.anonymous == Scope::None {
            return Err(Error::Unauthenticated(
                "this needs a token with scope = \"admin\"".into(),
            ));
        }
        Err(Error::PermissionDenied(format!(
            "{} may not list or purge who wrote results (that needs a token with scope = \"admin\")",
            p.who()
        )))
    }

    /// The status page and its API: any caller that may read some instance. Each view is
    /// then filtered to the instances the caller may read.
    pub fn authorize_status(&self, p: &Principal) -> Result<()> {
        if p.scope.allows(Access::Read) {
            return Ok(());
        }
        if p.name.is_none() && self.anonymous == Scope::None {
            return Err(Error::Unauthenticated(
                "this server requires a token (scope read or more) to show its status".into(),
            ));
        }
        Err(Error::PermissionDenied(format!(
            "{} may not see the server's status",
            p.who()
        )))
    }

    pub fn authorize(&self, p: &Principal, instance: &str, access: Access) -> Result<()> {
        if p.may(instance, access) {
            return Ok(());
        }
        let what = match access {
            Access::Read => "read from",
            Access::Upload => "upload blobs to",
            Access::Write => "write action results to",
            Access::Execute => "execute actions in",
            Access::Work => "attach as a worker for",
            Access::Administer => "administer",
        };
        if p.name.is_none() && self.anonymous == Scope::None {
            return Err(Error::Unauthenticated(format!(
                "this server requires a token to {what} the cache (pass --remote_header=authorization=Bearer TOKEN)"
            )));
        }
        let why = match (p.scope, access) {
            (Scope::Worker, Access::Write | Access::Execute) => {
                " (a worker token only runs actions; use a read-write token)"
            }
            _ => "",
        };
        Err(Error::PermissionDenied(format!(
            "{} may not {what} instance {instance:?}{why}",
            p.who()
        )))
    }
}

/// Parses an `Authorization` header value (gRPC metadata or HTTP).
pub fn parse_authorization(value: &str) -> Result<Credential> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Ok(Credential::Bearer(rest.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| Error::Unauthenticated("malformed basic credentials".into()))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| Error::Unauthenticated("basic credentials lack a ':'".into()))?;
        return Ok(Credential::Basic {
            user: user.into(),
            password: password.into(),
        });
    }
    Err(Error::Unauthenticated(
        "unsupported authorization scheme; use Bearer or Basic".into(),
    ))
}

/// The credentials of an HTTP request's `Authorization` header (Basic or Bearer), if any.
pub fn http_credential(headers: &axum::http::HeaderMap) -> Result<Option<Credential>> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| {
            parse_authorization(
                v.to_str().map_err(|_| {
                    Error::Unauthenticated("authorization header is not ASCII".into())
                })?,
            )
        })
        .transpose()
}

/// Reads the caller's credentials from gRPC request metadata.
pub fn grpc_credential<T>(req: &tonic::Request<T>) -> Result<Option<Credential>> {
    match req.metadata().get("authorization") {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().map_err(|_| {
                Error::Unauthenticated("authorization metadata is not ASCII".into())
            })?;
            parse_authorization(s).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, token: &str, scope: Scope, inst: Option<Vec<&str>>) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            sha256: hex::encode(hash_token(token)),
            scope,
            instances: inst.map(|v| v.into_iter().map(String::from).collect()),
            expires: None,
        }
    }

    #[test]
    fn each_scope_grants_only_its_column() {
        use Access::*;
        let table = [
            (Scope::Read, [true, false, false, false, false, false]),
            (Scope::ReadWrite, [true, true, true, true, false, false]),
            (Scope::Worker, [true, true, false, false, true, false]),
            (Scope::Admin, [true, false, false, false, false, true]),
            (Scope::None, [false; 6]),
        ];
        for (scope, row) in table {
            for (access, want) in [Read, Upload, Write, Execute, Work, Administer]
                .into_iter()
                .zip(row)
            {
                assert_eq!(scope.allows(access), want, "{scope:?} {access:?}");
            }
        }
    }

    #[test]
    fn an_expired_token_is_refused_by_name() {
        let mut old = cfg("old", "s1", Scope::ReadWrite, None);
        old.expires = Some("2020-01-01T00:00:00Z".into());
        let mut fresh = cfg("fresh", "s2", Scope::ReadWrite, None);
        fresh.expires = Some("2999-01-01T00:00:00+02:00".into());
        let a = Authenticator::new(Scope::None, &[old, fresh]).unwrap();
        match a.authenticate(Some(Credential::Bearer("s1".into()))) {
            Err(Error::Unauthenticated(m)) => assert!(m.contains("\"old\" has expired"), "{m}"),
            other => panic!("expired token accepted: {other:?}"),
        }
        assert!(a
            .authenticate(Some(Credential::Bearer("s2".into())))
            .is_ok());
        let mut bad = cfg("bad", "s3", Scope::Read, None);
        bad.expires = Some("tomorrow".into());
        assert_eq!(bad.validate().unwrap_err().0, "expires");
    }

    #[test]
    fn a_worker_token_cannot_write_results_and_a_client_token_cannot_attach() {
        let a = Authenticator::new(
            Scope::ReadWrite,
            &[
                cfg("w", "worker-secret", Scope::Worker, Some(vec!["x"])),
                cfg("ci", "rw-secret", Scope::ReadWrite, None),
            ],
        )
        .unwrap();
        let w = a
            .authenticate(Some(Credential::Bearer("worker-secret".into())))
            .unwrap();
        assert!(a.authorize_work(&w).is_ok());
        assert!(a.authorize(&w, "x", Access::Upload).is_ok());
        assert!(matches!(
            a.authorize(&w, "x", Access::Write),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            a.authorize(&w, "y", Access::Read),
            Err(Error::PermissionDenied(_))
        ));
        let ci = a
            .authenticate(Some(Credential::Bearer("rw-secret".into())))
            .unwrap();
        let e = a.authorize_work(&ci).unwrap_err();
        assert!(
            matches!(&e, Error::PermissionDenied(m) if m.contains("scope = \"worker\"")),
            "{e:?}"
        );
        // Not even anonymous read-write may attach.
        let anon = a.authenticate(None).unwrap();
        assert!(a.authorize_work(&anon).is_err());
    }

    #[test]
    fn scopes_and_instances() {
        let a = Authenticator::new(
            Scope::None,
            &[
                cfg("ci", "rw-secret", Scope::ReadWrite, None),
                cfg("dev", "r-secret", Scope::Read, Some(vec!["main"])),
            ],
        )
        .unwrap();
        let ci = a
            .authenticate(Some(Credential::Bearer("rw-secret".into())))
            .unwrap();
        assert!(a.authorize(&ci, "any", Access::Write).is_ok());
        let dev = a
            .authenticate(Some(Credential::Bearer("r-secret".into())))
            .unwrap();
        assert!(a.authorize(&dev, "main", Access::Read).is_ok());
        assert!(matches!(
            a.authorize(&dev, "main", Access::Write),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            a.authorize(&dev, "other", Access::Read),
            Err(Error::PermissionDenied(_))
        ));
        let anon = a.authenticate(None).unwrap();
        assert!(matches!(
            a.authorize(&anon, "", Access::Read),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            a.authenticate(Some(Credential::Bearer("wrong".into()))),
            Err(Error::Unauthenticated(_))
        ));
    }

    #[test]
    fn basic_auth_binds_user_to_token() {
        let a = Authenticator::new(Scope::None, &[cfg("ci", "s3cret", Scope::ReadWrite, None)])
            .unwrap();
        let ok = Credential::Basic {
            user: "ci".into(),
            password: "s3cret".into(),
        };
        assert!(a.authenticate(Some(ok)).is_ok());
        let wrong_user = Credential::Basic {
            user: "eve".into(),
            password: "s3cret".into(),
        };
        assert!(a.authenticate(Some(wrong_user)).is_err());
    }

    #[test]
    fn parses_headers() {
        assert_eq!(
            parse_authorization("Bearer abc").unwrap(),
            Credential::Bearer("abc".into())
        );
        let b = base64::engine::general_purpose::STANDARD.encode("u:p:q");
        assert_eq!(
            parse_authorization(&format!("Basic {b}")).unwrap(),
            Credential::Basic {
                user: "u".into(),
                password: "p:q".into()
            }
        );
        assert!(parse_authorization("Digest x").is_err());
        assert!(parse_authorization("Bearer").is_err());
    }
}
