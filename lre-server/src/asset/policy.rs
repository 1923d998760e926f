//! Where downloads may go. Every URL (the first and each redirect) must be http(s), carry no
//! credentials and name an allowed host; every address actually connected to must be public
//! or in `allowed_private_ranges`. Names are checked in the resolver, because that is where
//! the address the connection uses is decided (no second lookup to rebind); IP literals,
//! which reqwest never resolves, are checked on the URL.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::asset::{AssetConfig, Host, HostPattern};

/// Redirect hops followed before giving up.
pub const MAX_REDIRECTS: usize = 5;

/// Why a URL or address may not be fetched. Travels through reqwest's errors (from the
/// resolver and the redirect policy) and is found again by downcasting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

pub struct Policy {
    hosts: Vec<HostPattern>,
    private_ok: Vec<IpNet>,
}

impl Policy {
    pub fn new(cfg: &AssetConfig) -> Result<Policy, String> {
        Ok(Policy {
            hosts: cfg
                .allowed_hosts
                .iter()
                .map(|h| HostPattern::parse(h))
                .collect::<Result<_, _>>()?,
            private_ok: cfg.allowed_private_ranges.clone(),
        })
    }

    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused(format!(
                "scheme {:?} is not supported (only http and https)",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused(
                "URLs with credentials (user:password@) are refused: downloads land in a shared cache".into(),
            ));
        }
        let host = Host::parse(
            url.host_str()
                .ok_or_else(|| Refused("the URL has no host".into()))?,
        );
        self.check_host(&host)?;
        if let Host::Ip(ip) = host {
            self.check_ip(ip)?;
        }
        Ok(())
    }

    pub fn check_host(&self, host: &Host) -> Result<(), Refused> {
        if self.hosts.is_empty() {
            return Err(Refused(format!(
                "host {host} is not allowed: downloads are off because asset.allowed_hosts is empty"
            )));
        }
        if !self.hosts.iter().any(|p| p.matches(host)) {
            return Err(Refused(format!(
                "host {host} is not in asset.allowed_hosts"
            )));
        }
        Ok(())
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refused> {
        let Some((range, what)) = denied_range(ip) else {
            return Ok(());
        };
        let v4 = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let allowed = self
            .private_ok
            .iter()
            .any(|c| c.contains(&ip) || v4.is_some_and(|v4| c.contains(&v4)));
        if allowed {
            return Ok(());
        }
        Err(Refused(format!(
            "address {ip} is {what} ({range}); list it in asset.allowed_private_ranges to allow it"
        )))
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(a: u16, b: u16, c: u16, d: u16, prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0), prefix)
}

/// IPv4 ranges that are not the public internet (IANA special-purpose registry), with what
/// they are. Looked up in order: the first match names the range.
const DENIED_V4: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 8), "unspecified (\"this network\")"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(100, 64, 0, 0, 10), "shared address space (CGNAT)"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (v4(192, 0, 2, 0, 24), "documentation (TEST-NET-1)"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation (TEST-NET-2)"),
    (v4(203, 0, 113, 0, 24), "documentation (TEST-NET-3)"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved (and broadcast)"),
];

const DENIED_V6: &[(Ipv6Net, &str)] = &[
    (v6(0, 0, 0, 0, 128), "unspecified"),
    (Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128), "loopback"),
    (v6(0, 0, 0, 0, 96), "IPv4-compatible (deprecated)"),
    (v6(0x64, 0xff9b, 1, 0, 48), "local-use NAT64"),
    (v6(0x100, 0, 0, 0, 64), "discard-only"),
    (v6(0x2001, 0xdb8, 0, 0, 32), "documentation"),
    (
        v6(0x2001, 0, 0, 0, 23),
        "IETF protocol assignments (incl. Teredo)",
    ),
    (v6(0x3fff, 0, 0, 0, 20), "documentation"),
    (v6(0xfc00, 0, 0, 0, 7), "unique-local"),
    (v6(0xfe80, 0, 0, 0, 10), "link-local"),
    (v6(0xfec0, 0, 0, 0, 10), "site-local (deprecated)"),
    (v6(0xff00, 0, 0, 0, 8), "multicast"),
    // Last, as a catch-all for the rest of the block above (after the IPv4-mapped
    // addresses, which are judged as IPv4 first): e.g. SIIT's ::ffff:0:a.b.c.d.
    (v6(0, 0, 0, 0, 8), "reserved by the IETF"),
];

/// The IPv4 address inside an IPv4-mapped (::ffff:0:0/96), NAT64 (64:ff9b::/96) or 6to4
/// (2002::/16) address: each reaches that IPv4 address, so it is judged as that address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..5] == [0; 5] && s[5] == 0xffff {
        return Some(low);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The special-purpose range `ip` is in, with what it is; `None` for public addresses.
pub fn denied_range(ip: IpAddr) -> Option<(IpNet, &'static str)> {
    match ip {
        IpAddr::V4(v4) => DENIED_V4
            .iter()
            .find(|(net, _)| net.contains(&v4))
            .map(|(net, what)| (IpNet::V4(*net), *what)),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(inner) => denied_range(IpAddr::V4(inner)),
            None => DENIED_V6
                .iter()
                .find(|(net, _)| net.contains(&v6))
                .map(|(net, what)| (IpNet::V6(*net), *what)),
        },
    }
}

/// Resolves names with the system resolver and keeps only the addresses the policy allows,
/// so a name cannot lead a download to a private address.
pub struct GuardedResolver {
    pub policy: Arc<Policy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(resolve_guarded(
            self.policy.clone(),
            name.as_str().to_string(),
        ))
    }
}

async fn resolve_guarded(
    policy: Arc<Policy>,
    name: String,
) -> Result<Addrs, Box<dyn std::error::Error + Send + Sync>> {
    policy.check_host(&Host::parse(&name))?;
    let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
    let mut refused = Vec::new();
    let allowed: Vec<SocketAddr> = found
        .into_iter()
        .filter(|a| match policy.check_ip(a.ip()) {
            Ok(()) => true,
            Err(e) => {
                refused.push(e.0);
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        // The addresses go to the log only: telling the caller what an internal name
        // resolves to would make the server a DNS oracle for the network it stands in.
        if refused.is_empty() {
            return Err(Box::new(Refused(format!("{name} resolves to no address"))));
        }
        tracing::info!(%name, refused = ?refused, "a download's host resolves only to refused addresses");
        return Err(Box::new(Refused(format!(
            "{name} resolves only to addresses downloads may not reach (private or \
             special-purpose ranges; an operator can allow ranges in \
             asset.allowed_private_ranges)"
        ))));
    }
    tracing::debug!(%name, addrs = ?allowed, "resolved for a download");
    Ok(Box::new(allowed.into_iter()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(s: &str) -> Option<String> {
        denied_range(s.parse().unwrap()).map(|(range, _)| range.to_string())
    }

    #[test]
    fn every_special_range_is_denied() {
        let cases = [
            ("0.0.0.0", "0.0.0.0/8"),
            ("10.20.30.40", "10.0.0.0/8"),
            ("100.64.0.1", "100.64.0.0/10"),
            ("100.127.255.254", "100.64.0.0/10"),
            ("127.0.0.1", "127.0.0.0/8"),
            ("127.255.0.9", "127.0.0.0/8"),
            ("169.254.169.254", "169.254.0.0/16"),
            ("172.16.0.1", "172.16.0.0/12"),
            ("172.31.255.255", "172.16.0.0/12"),
            ("192.0.0.8", "192.0.0.0/24"),
            ("192.0.2.1", "192.0.2.0/24"),
            ("192.88.99.1", "192.88.99.0/24"),
            ("192.168.1.1", "192.168.0.0/16"),
            ("198.18.0.1", "198.18.0.0/15"),
            ("198.19.255.1", "198.18.0.0/15"),
            ("198.51.100.7", "198.51.100.0/24"),
            ("203.0.113.9", "203.0.113.0/24"),
            ("224.0.0.251", "224.0.0.0/4"),
            ("239.255.255.250", "224.0.0.0/4"),
            ("240.0.0.1", "240.0.0.0/4"),
            ("255.255.255.255", "240.0.0.0/4"),
            ("::", "::/128"),
            ("::1", "::1/128"),
            ("::10.0.0.1", "::/96"),
            ("64:ff9b:1::1", "64:ff9b:1::/48"),
            ("100::1", "100::/64"),
            ("2001:db8::1", "2001:db8::/32"),
            ("2001::1", "2001::/23"),
            ("3fff::1", "3fff::/20"),
            ("fc00::1", "fc00::/7"),
            ("fd12:3456::1", "fc00::/7"),
            ("fe80::1", "fe80::/10"),
            ("fec0::1", "fec0::/10"),
            ("ff02::1", "ff00::/8"),
            // IPv4 inside IPv6 is judged as the IPv4 address it reaches.
            ("::ffff:127.0.0.1", "127.0.0.0/8"),
            ("::ffff:10.1.2.3", "10.0.0.0/8"),
            ("64:ff9b::a9fe:a9fe", "169.254.0.0/16"),
            ("2002:c0a8:0101::1", "192.168.0.0/16"),
            // The rest of the IETF-reserved ::/8, such as SIIT's IPv4-translated form.
            ("::ffff:0:7f00:1", "::/8"),
            ("::1:0:0:1", "::/8"),
        ];
        for (ip, want) in cases {
            assert_eq!(denied(ip).as_deref(), Some(want), "{ip}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "192.0.1.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert_eq!(denied(public), None, "{public}");
        }
    }

    fn policy(hosts: &[&str], private: &[&str]) -> Policy {
        Policy::new(&AssetConfig {
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            allowed_private_ranges: private.iter().map(|s| s.parse().unwrap()).collect(),
            ..AssetConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn urls_are_checked_for_scheme_credentials_host_and_literal_address() {
        let p = policy(
            &["*.example.com", "127.0.0.1", "10.0.0.1"],
            &["127.0.0.1/32"],
        );
        let check = |u: &str| p.check_url(&Url::parse(u).unwrap()).map_err(|e| e.0);
        assert!(check("https://dl.example.com/a.tgz").is_ok());
        assert!(check("http://127.0.0.1:8080/x").is_ok());
        assert!(check("ftp://dl.example.com/x")
            .unwrap_err()
            .contains("scheme"));
        assert!(check("file:///etc/passwd").unwrap_err().contains("scheme"));
        assert!(check("https://u:p@dl.example.com/x")
            .unwrap_err()
            .contains("credentials"));
        assert!(check("https://example.org/x")
            .unwrap_err()
            .contains("asset.allowed_hosts"));
        let e = check("http://10.0.0.1/x").unwrap_err();
        assert!(
            e.contains("private") && e.contains("asset.allowed_private_ranges"),
            "{e}"
        );
        // The URL parser normalises other spellings of an address first.
        assert!(check("http://0x7f.0.0.1/x").is_ok());
        assert!(check("http://127.0.0.2/x").is_err());
        let closed = policy(&[], &[]);
        let e = closed
            .check_url(&Url::parse("https://dl.example.com/").unwrap())
            .unwrap_err();
        assert!(e.0.contains("asset.allowed_hosts is empty"), "{e}");
    }

    #[test]
    fn allowed_private_ranges_also_cover_mapped_addresses() {
        let p = policy(&["*"], &["127.0.0.1/32", "fd00::/8"]);
        assert!(p.check_ip("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check_ip("::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check_ip("127.0.0.2".parse().unwrap()).is_err());
        assert!(p.check_ip("fd00::5".parse().unwrap()).is_ok());
        assert!(p.check_ip("fc00::5".parse().unwrap()).is_err());
        assert!(p.check_ip("93.184.215.14".parse().unwrap()).is_ok());
    }
}
