//! Who may read and who may write. A cache writer can poison every reader, so every
//! write path asks `authorize(.., Access::Write)` before touching the store.

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Scope {
    fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Scope::ReadWrite, _) | (Scope::Read, Access::Read)
        )
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Scope::None),
            "read" => Ok(Scope::Read),
            "read-write" => Ok(Scope::ReadWrite),
            _ => Err(format!("{s:?} is not one of none, read, read-write")),
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
}

impl TokenConfig {
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
                "a token must grant \"read\" or \"read-write\"".into(),
            ));
        }
        Ok(())
    }
}

struct Token {
    name: String,
    hash: [u8; 32],
    scope: Scope,
    instances: Option<Vec<String>>,
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
}

impl Principal {
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
                Ok(Token {
                    name: t.name.clone(),
                    hash,
                    scope: t.scope,
                    instances: t.instances.clone(),
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
            Some(t) if presented_user.as_deref().is_none_or(|u| u == t.name) => Ok(Principal {
                name: Some(t.name.clone()),
                scope: t.scope,
                instances: t.instances.clone(),
            }),
            _ => Err(Error::Unauthenticated(
                "the presented token is not valid for this server".into(),
            )),
        }
    }

    pub fn authorize(&self, p: &Principal, instance: &str, access: Access) -> Result<()> {
        if p.may(instance, access) {
            return Ok(());
        }
        let what = match access {
            Access::Read => "read from",
            Access::Write => "write to",
        };
        if p.name.is_none() && self.anonymous == Scope::None {
            return Err(Error::Unauthenticated(format!(
                "this server requires a token to {what} the cache (pass --remote_header=authorization=Bearer TOKEN)"
            )));
        }
        Err(Error::PermissionDenied(format!(
            "{} may not {what} instance {instance:?}",
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
        }
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
