//! Why an input is not the Nix format it claims to be. Each variant says what was wrong
//! in words a user can act on; none carries more of the input than a short excerpt.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not nixbase32: {0}")]
    Base32(String),
    #[error("bad hash {0}")]
    Hash(String),
    #[error("bad store path {0}")]
    StorePath(String),
    #[error("bad NAR: {0}")]
    Nar(String),
    #[error("bad narinfo: {0}")]
    NarInfo(String),
    #[error("bad key or signature: {0}")]
    Signature(String),
    #[error("bad content address {0}")]
    ContentAddress(String),
}

/// At most `max` characters of `s`, for quoting input in an error.
pub(crate) fn excerpt(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}…")
    }
}
