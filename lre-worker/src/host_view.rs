//! What of the host an action sees by default, read-only: the Nix store, the system's
//! program and library directories, and the few places under `/etc` that those programs
//! reach through symlinks — and nothing else of `/etc`, which holds the host's secrets.
//!
//! Debian and Ubuntu route many tools through `/etc/alternatives` (`/usr/bin/awk`,
//! `cc`, `c++`, `java`, `pager`…), and OpenJDK links its configuration into
//! `/etc/java-N-openjdk` and its CA store into `/etc/ssl/certs/java`. Rather than a fixed
//! list that is wrong on the next distribution, the worker follows the symlinks in the
//! program directories and the JVM directory and shows exactly the files under `/etc`
//! they reach — not the directories around them, where an administrator may keep a
//! password file (`/etc/java-17-openjdk/management/jmxremote.password`) — unless the
//! file's real path (symlinked directories resolved) names something secret.
//! `/etc/alternatives` holds only dpkg's links and is shown whole. NixOS puts programs
//! in `/run/current-system/sw`, which is shown when it exists.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// Always shown when present.
const BASE: &[&str] = &[
    "/nix/store",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/lib32",
    "/libx32",
    // The dynamic loader's cache and search path: without them it still works, slower.
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    // NixOS: the system profile (a link into /nix/store) that PATH points at.
    "/run/current-system",
];

/// Directories whose symlinks are followed to find what else under /etc tools need.
const SCANNED: &[&str] = &[
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/bin",
    "/sbin",
    "/usr/lib/jvm",
];

/// A path under /etc with one of these components is never shown, even if a link leads
/// there: keys, password databases, credentials.
const SECRET_WORDS: &[&str] = &[
    "private",
    "secret",
    "password",
    "passwd",
    "shadow",
    "token",
    "credential",
    "credstore",
];
const SECRET: &[&str] = &[
    "private",
    "shadow",
    "gshadow",
    "sudoers",
    "sudoers.d",
    "ssh",
    "lre",
    "secrets",
    "kubernetes",
    "docker",
    "containerd",
    "wireguard",
    "ipsec.d",
    "krb5.keytab",
    "NetworkManager",
    "polkit-1",
    "letsencrypt",
    "mysql",
    "openvpn",
    "keys",
];

/// Bounds on the scan, so a huge or looping tree cannot stall the worker's start.
const MAX_ENTRIES: usize = 200_000;
const MAX_DEPTH: usize = 8;
const MAX_HOPS: usize = 40;

/// The default read-only paths for this host, sorted, each existing.
pub fn default_ro_paths() -> Vec<PathBuf> {
    let mut paths: BTreeSet<PathBuf> = BASE
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect();
    let mut budget = MAX_ENTRIES;
    for dir in SCANNED {
        scan(Path::new(dir), 0, &mut budget, &mut paths);
    }
    // A path inside another shown one adds nothing.
    let all: Vec<PathBuf> = paths.iter().cloned().collect();
    paths.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    paths.into_iter().collect()
}

/// Iterative over directories (a stack, not recursion), depth- and entry-bounded.
fn scan(root: &Path, depth0: usize, budget: &mut usize, out: &mut BTreeSet<PathBuf>) {
    let mut stack = vec![(root.to_path_buf(), depth0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_symlink() {
                for hop in etc_hops(&e.path()) {
                    if let Some(p) = shown_hop(&hop) {
                        out.insert(p);
                    }
                }
            } else if ft.is_dir() && depth + 1 < MAX_DEPTH {
                stack.push((e.path(), depth + 1));
            }
        }
    }
}

/// Every path under /etc that resolving `link` passes through, hop by hop.
fn etc_hops(link: &Path) -> Vec<PathBuf> {
    let mut hops = vec![];
    let mut cur = link.to_path_buf();
    for _ in 0..MAX_HOPS {
        let Ok(target) = std::fs::read_link(&cur) else {
            break;
        };
        let next = match cur.parent() {
            Some(parent) if target.is_relative() => normalize(&parent.join(&target)),
            _ => normalize(&target),
        };
        if next.starts_with("/etc") {
            hops.push(next.clone());
        }
        cur = next;
    }
    hops
}

/// Lexical `.`/`..` folding of an absolute path (symlinks are followed hop by hop above).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// What to show for one step of a link chain that lands under /etc: the step itself, if
/// it exists and neither it nor what it really is (every symlink resolved, as bubblewrap
/// will when it binds it) is secret or /etc as a whole.
fn shown_hop(hop: &Path) -> Option<PathBuf> {
    if hop.starts_with("/etc/alternatives") {
        return None; // shown whole from BASE
    }
    let real = std::fs::canonicalize(hop).ok()?;
    let real_ok = shareable(&real) || !real.starts_with("/etc");
    (shareable(hop) && real_ok).then(|| hop.to_path_buf())
}

fn shareable(path: &Path) -> bool {
    path != Path::new("/etc")
        && path.starts_with("/etc")
        && !path.components().any(|c| {
            let c = c.as_os_str().to_string_lossy().to_ascii_lowercase();
            SECRET.iter().any(|s| c == s.to_ascii_lowercase())
                || SECRET_WORDS.iter().any(|w| c.contains(w))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_etc_itself_are_never_shared() {
        assert!(shareable(Path::new("/etc/alternatives")));
        assert!(shareable(Path::new("/etc/java-17-openjdk/security")));
        assert!(shareable(Path::new("/etc/ssl/certs/java")));
        for bad in [
            "/etc",
            "/etc/ssl/private",
            "/etc/ssh",
            "/etc/lre",
            "/usr/lib",
            "/etc/x/shadow",
            "/etc/java-17-openjdk/management/jmxremote.password",
            "/etc/letsencrypt/live/x/privkey.pem",
            "/etc/app/Secrets.d/x",
        ] {
            assert!(!shareable(Path::new(bad)), "{bad}");
        }
    }

    #[test]
    fn links_are_followed_hop_by_hop_into_etc() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        // a -> b (relative) -> /etc/alternatives/zz-lre-test (absolute, need not exist)
        std::os::unix::fs::symlink("b", &a).unwrap();
        std::os::unix::fs::symlink("/etc/alternatives/zz-lre-test", d.path().join("b")).unwrap();
        assert_eq!(
            etc_hops(&a),
            vec![PathBuf::from("/etc/alternatives/zz-lre-test")]
        );
        // A loop ends after MAX_HOPS.
        std::os::unix::fs::symlink("loop2", d.path().join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", d.path().join("loop2")).unwrap();
        assert!(etc_hops(&d.path().join("loop1")).is_empty());
        assert_eq!(
            normalize(Path::new("/usr/bin/../../etc/./x")),
            PathBuf::from("/etc/x")
        );
    }

    #[test]
    fn a_hop_through_a_symlinked_directory_is_judged_by_its_real_path() {
        // /etc/ssh exists on most hosts; whatever a link names, a path whose real location
        // is secret is never shown, and neither is a missing one.
        assert_eq!(shown_hop(Path::new("/etc/ssh/sshd_config")), None);
        assert_eq!(shown_hop(Path::new("/etc/lre-no-such-file")), None);
        assert_eq!(
            shown_hop(Path::new("/etc/alternatives/awk")),
            None,
            "shown whole instead"
        );
        if Path::new("/etc/ld.so.conf").is_file() {
            assert_eq!(
                shown_hop(Path::new("/etc/ld.so.conf")),
                Some(PathBuf::from("/etc/ld.so.conf"))
            );
        }
    }

    #[test]
    fn the_default_view_covers_this_hosts_tools_and_hides_etc() {
        let paths = default_ro_paths();
        assert!(paths.contains(&PathBuf::from("/usr")), "{paths:?}");
        assert!(!paths.iter().any(|p| p == Path::new("/etc")), "{paths:?}");
        assert!(
            !paths.iter().any(|p| !shareable(p) && p.starts_with("/etc")),
            "{paths:?}"
        );
        // Only files (and /etc/alternatives) of /etc, never the directories around them.
        for p in paths.iter().filter(|p| p.starts_with("/etc")) {
            assert!(
                p.starts_with("/etc/alternatives")
                    || p.starts_with("/etc/ld.so.conf.d")
                    || !p.is_dir(),
                "{} is a directory",
                p.display()
            );
        }
        // Every link in /usr/bin that goes through /etc resolves inside the view.
        for e in std::fs::read_dir("/usr/bin").unwrap().flatten() {
            for hop in etc_hops(&e.path()) {
                assert!(
                    paths.iter().any(|p| hop.starts_with(p)) || shown_hop(&hop).is_none(),
                    "{} goes through {} which is not shown",
                    e.path().display(),
                    hop.display()
                );
            }
        }
    }
}
