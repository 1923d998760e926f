//! The `[asset]` table: the Remote Asset API and the limits on what its downloader reaches.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use lre_store::config::ByteSize;

use super::{invalid, ConfigError};

/// The Remote Asset API (Fetch, Push), which Bazel uses with `--experimental_remote_downloader`.
///
/// On by default, so that Bazel finds the service, but it downloads nothing until
/// `allowed_hosts` names the hosts it may fetch from: an open downloader would let any
/// read-write caller make the server fetch from wherever its network reaches (SSRF).
/// Until then Fetch answers only what was pushed (or downloaded under an earlier config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssetConfig {
    /// Serve the Fetch and Push services.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Hosts downloads may reach, also after redirects: exact names or addresses
    /// ("mirror.example.com", "127.0.0.1"), "*.example.com" for every name under
    /// example.com, or "*" for any host. Empty: no downloads at all.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Private, loopback, link-local and other special-purpose addresses are never
    /// connected to, whatever name resolves to them, unless they are in one of these ranges
    /// ("10.1.0.0/16", "127.0.0.1/32", "::1/128").
    #[serde(default, deserialize_with = "private_ranges")]
    pub allowed_private_ranges: Vec<IpNet>,
    /// Largest download (and largest unpacked archive for FetchDirectory): bytes, or "1GiB".
    #[serde(default = "default_max_download")]
    pub max_download_bytes: ByteSize,
    /// A download that has not finished after this long fails; requests may ask for less.
    #[serde(default = "default_download_timeout")]
    pub download_timeout_seconds: u64,
    /// Time to open the TCP (and TLS) connection to an upstream.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_seconds: u64,
    /// Downloads running at once; further ones wait (within their timeout).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_downloads: usize,
}

impl Default for AssetConfig {
    fn default() -> Self {
        AssetConfig {
            enabled: true,
            allowed_hosts: vec![],
            allowed_private_ranges: vec![],
            max_download_bytes: default_max_download(),
            download_timeout_seconds: default_download_timeout(),
            connect_timeout_seconds: default_connect_timeout(),
            max_concurrent_downloads: default_max_concurrent(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_max_download() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_download_timeout() -> u64 {
    300
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_max_concurrent() -> usize {
    4
}

impl AssetConfig {
    /// On failure returns the offending key and why.
    pub fn validate(&self, store_capacity: u64) -> Result<(), ConfigError> {
        for (i, h) in self.allowed_hosts.iter().enumerate() {
            HostPattern::parse(h).map_err(|m| invalid(format!("asset.allowed_hosts[{i}]"), m))?;
        }
        let max = self.max_download_bytes.0;
        if max == 0 {
            return Err(invalid(
                "asset.max_download_bytes",
                "must be greater than zero",
            ));
        }
        // Only where downloads are on: a small store with the default limit is no error.
        if max > store_capacity && !self.allowed_hosts.is_empty() {
            return Err(invalid(
                "asset.max_download_bytes",
                format!("({max} bytes) is larger than the store takes ({store_capacity} bytes): a download must fit in the store"),
            ));
        }
        for (k, v) in [
            (
                "asset.download_timeout_seconds",
                self.download_timeout_seconds,
            ),
            (
                "asset.connect_timeout_seconds",
                self.connect_timeout_seconds,
            ),
            (
                "asset.max_concurrent_downloads",
                self.max_concurrent_downloads as u64,
            ),
        ] {
            if v == 0 {
                return Err(invalid(k, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// One entry of `allowed_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// ".example.com": matches names ending so, not example.com itself.
    Suffix(String),
    Ip(IpAddr),
}

/// A URL's host as the policy sees it: a lowercase name without a trailing dot, or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Host {
    /// `s` as `Url::host_str` gives it (IPv6 in brackets) or as a resolver sees it.
    pub fn parse(s: &str) -> Host {
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(s.trim_end_matches('.').to_ascii_lowercase()),
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let t = s.trim();
        if t == "*" {
            return Ok(HostPattern::Any);
        }
        if let Host::Ip(ip) = Host::parse(t) {
            return Ok(HostPattern::Ip(ip));
        }
        let (suffix, name) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} is not a host name, an IP address, \"*.domain\" or \"*\" (no scheme, port or path; international names in punycode)"
            ));
        }
        Ok(if suffix {
            HostPattern::Suffix(format!(".{name}"))
        } else {
            HostPattern::Exact(name)
        })
    }

    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (HostPattern::Any, _) => true,
            (HostPattern::Exact(p), Host::Name(n)) => p == n,
            (HostPattern::Suffix(p), Host::Name(n)) => n.len() > p.len() && n.ends_with(p),
            (HostPattern::Ip(p), Host::Ip(ip)) => p == ip,
            _ => false,
        }
    }
}

/// Deserializes `allowed_private_ranges`: each entry an address range ("10.0.0.0/8",
/// "::1/128") or a bare address, which is a range of one (ipnet's own parser wants the
/// prefix). A bad entry is named by its key and index, as toml does not say which one.
fn private_ranges<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            parse_range(s).map_err(|m| {
                serde::de::Error::custom(format!("asset.allowed_private_ranges[{i}]: {m}"))
            })
        })
        .collect()
}

/// "10.0.0.0/8", "::1/128", or a bare address as a /32 or /128.
pub fn parse_range(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an address range such as \"10.0.0.0/8\" or \"::1/128\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_with_or_without_a_prefix() {
        let c = parse_range("10.1.0.0/16").unwrap();
        assert!(c.contains(&"10.1.255.3".parse::<IpAddr>().unwrap()));
        assert!(!c.contains(&"10.2.0.1".parse::<IpAddr>().unwrap()));
        assert!(!c.contains(&"::ffff:10.1.0.1".parse::<IpAddr>().unwrap()));
        let one = parse_range(" 127.0.0.1 ").unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(one.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()));
        assert!(!one.contains(&"127.0.0.2".parse::<IpAddr>().unwrap()));
        assert_eq!(parse_range("::1").unwrap().to_string(), "::1/128");
        let all = parse_range("::/0").unwrap();
        assert!(all.contains(&"2001:db8::1".parse::<IpAddr>().unwrap()));
        // A range need not be written truncated; it covers its network as before.
        assert!(parse_range("10.1.2.3/16")
            .unwrap()
            .contains(&"10.1.9.9".parse::<IpAddr>().unwrap()));
        for bad in ["10.0.0.0/33", "example.com/8", "::1/129", "10.0.0.0/", ""] {
            assert!(parse_range(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn private_ranges_deserialize_and_bad_ones_name_the_key() {
        let c: AssetConfig =
            toml::from_str("allowed_private_ranges = [\"127.0.0.1\", \"fd00::/8\"]").unwrap();
        let shown: Vec<String> = c
            .allowed_private_ranges
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(shown, ["127.0.0.1/32", "fd00::/8"]);
        let e =
            toml::from_str::<AssetConfig>("allowed_private_ranges = [\"10.0.0.0/8\", \"nope\"]")
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("asset.allowed_private_ranges[1]")
                && e.contains("\"nope\" is not an address range"),
            "{e}"
        );
    }

    #[test]
    fn host_patterns() {
        let p = |s: &str| HostPattern::parse(s).unwrap();
        let h = Host::parse;
        assert!(p("Mirror.Example.com.").matches(&h("mirror.example.com")));
        assert!(!p("example.com").matches(&h("www.example.com")));
        assert!(p("*.example.com").matches(&h("a.b.example.com")));
        assert!(!p("*.example.com").matches(&h("example.com")));
        assert!(!p("*.example.com").matches(&h("badexample.com")));
        assert!(p("127.0.0.1").matches(&h("127.0.0.1")));
        assert!(p("[::1]").matches(&h("[::1]")));
        assert!(!p("127.0.0.1").matches(&h("localhost")));
        assert!(p("*").matches(&h("10.0.0.1")));
        for bad in [
            "https://example.com",
            "example.com:443",
            "a/b",
            "*x.com",
            "",
            "ex ample.com",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn validate_names_the_key() {
        let mut c = AssetConfig {
            allowed_hosts: vec!["ok.example.com".into(), "http://x".into()],
            ..AssetConfig::default()
        };
        let key = |e: ConfigError| match e {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        };
        assert_eq!(
            key(c.validate(1 << 40).unwrap_err()),
            "asset.allowed_hosts[1]"
        );
        c.allowed_hosts.pop();
        assert!(c.validate(1 << 40).is_ok());
        assert_eq!(
            key(c.validate(1 << 20).unwrap_err()),
            "asset.max_download_bytes"
        );
        assert!(AssetConfig::default().validate(1 << 20).is_ok());
        c.max_concurrent_downloads = 0;
        assert_eq!(
            key(c.validate(1 << 40).unwrap_err()),
            "asset.max_concurrent_downloads"
        );
    }
}
