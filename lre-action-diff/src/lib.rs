//! Why two actions got different cache keys. `lre explain` compares Bazel execution logs
//! with it, and lre-server compares the Action and Command messages of two invocations:
//! one comparison, so both say the same thing.

use std::collections::{BTreeMap, BTreeSet};

/// Where Nix keeps store paths; the differences are traced back to these.
pub const STORE_DIR: &str = "/nix/store";

/// One spawn, in the shape `lre explain` compares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Spawn {
    pub mnemonic: String,
    pub target_label: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Input path → `hash/size` (empty for a directory or runfiles tree without digest).
    pub inputs: BTreeMap<String, String>,
    pub outputs: Vec<String>,
    pub platform: BTreeMap<String, String>,
    /// The action key, when Bazel logged one.
    pub digest: Option<String>,
    pub cache_hit: bool,
}

impl Spawn {
    /// What identifies "the same action" in two builds: its first output.
    pub fn identity(&self) -> String {
        self.outputs
            .first()
            .cloned()
            .unwrap_or_else(|| format!("{} {}", self.mnemonic, self.args.join(" ")))
    }
}

/// Actions of both builds whose keys differ, each with its differences.
#[derive(Debug)]
pub struct Report {
    pub total_a: usize,
    pub total_b: usize,
    pub common: usize,
    pub only_a: Vec<String>,
    pub only_b: Vec<String>,
    pub differing: Vec<(Spawn, Vec<String>)>,
    pub store_paths_a: BTreeSet<String>,
    pub store_paths_b: BTreeSet<String>,
}

/// Differences listed per action before the rest are counted in one line: an action with
/// a million differing arguments must not make a million lines (or their memory).
pub const MAX_DIFFERENCES: usize = 200;

pub fn compare(a: &[Spawn], b: &[Spawn]) -> Report {
    // By reference: the logs may be large, and only differing actions are copied out.
    fn index(log: &[Spawn]) -> BTreeMap<String, &Spawn> {
        log.iter().map(|s| (s.identity(), s)).collect()
    }
    let (ia, ib) = (index(a), index(b));
    let mut r = Report {
        total_a: a.len(),
        total_b: b.len(),
        common: 0,
        only_a: ia
            .keys()
            .filter(|k| !ib.contains_key(*k))
            .cloned()
            .collect(),
        only_b: ib
            .keys()
            .filter(|k| !ia.contains_key(*k))
            .cloned()
            .collect(),
        differing: Vec::new(),
        store_paths_a: BTreeSet::new(),
        store_paths_b: BTreeSet::new(),
    };
    for (key, sa) in &ia {
        let Some(sb) = ib.get(key) else { continue };
        r.common += 1;
        let diffs = differences(sa, sb);
        let same_key = match (&sa.digest, &sb.digest) {
            (Some(x), Some(y)) => x == y,
            _ => diffs.is_empty(),
        };
        if same_key {
            continue;
        }
        let (pa, pb) = (store_paths(sa), store_paths(sb));
        r.store_paths_a.extend(pa.difference(&pb).cloned());
        r.store_paths_b.extend(pb.difference(&pa).cloned());
        r.differing.push(((*sa).clone(), diffs));
    }
    r
}

/// Every part of an action that goes into its key, compared: at most `MAX_DIFFERENCES`
/// lines, then one that counts the rest.
pub fn differences(a: &Spawn, b: &Spawn) -> Vec<String> {
    let mut d = Lines::default();
    collect_differences(&mut d, a, b);
    if d.more > 0 {
        d.lines
            .push(format!("… and {} more differences not listed", d.more));
    }
    d.lines
}

/// Lines up to `MAX_DIFFERENCES`, and how many more there were.
#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    more: usize,
}

impl Lines {
    fn push(&mut self, line: impl FnOnce() -> String) {
        if self.lines.len() < MAX_DIFFERENCES {
            self.lines.push(line());
        } else {
            self.more += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.more == 0
    }
}

fn collect_differences(d: &mut Lines, a: &Spawn, b: &Spawn) {
    if a.args.len() == b.args.len() {
        for (i, (x, y)) in a.args.iter().zip(&b.args).enumerate() {
            if x != y {
                d.push(|| format!("argument {i}: {x:?} → {y:?}"));
            }
        }
    } else {
        d.push(|| format!("argument count: {} → {}", a.args.len(), b.args.len()));
        let (sa, sb): (BTreeSet<_>, BTreeSet<_>) =
            (a.args.iter().collect(), b.args.iter().collect());
        for x in sa.difference(&sb) {
            d.push(|| format!("argument only in A: {x:?}"));
        }
        for x in sb.difference(&sa) {
            d.push(|| format!("argument only in B: {x:?}"));
        }
    }
    map_diff(d, "environment variable", &a.env, &b.env);
    map_diff(d, "input", &a.inputs, &b.inputs);
    map_diff(d, "platform property", &a.platform, &b.platform);
    if a.outputs != b.outputs {
        d.push(|| format!("outputs: {:?} → {:?}", a.outputs, b.outputs));
    }
    if d.is_empty() && a.digest != b.digest {
        d.push(|| {
            format!(
                "action key {} → {} with identical logged inputs (a difference the log does not show, e.g. a timeout or an input's tool flag)",
                a.digest.as_deref().unwrap_or("?"),
                b.digest.as_deref().unwrap_or("?")
            )
        });
    }
}

fn map_diff(
    out: &mut Lines,
    what: &str,
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) {
    for (k, va) in a {
        match b.get(k) {
            None => out.push(|| format!("{what} only in A: {k}={va}")),
            Some(vb) if vb != va => out.push(|| format!("{what} {k}: {va:?} → {vb:?}")),
            _ => {}
        }
    }
    for (k, vb) in b {
        if !a.contains_key(k) {
            out.push(|| format!("{what} only in B: {k}={vb}"));
        }
    }
}

/// The `/nix/store/<hash>-<name>` paths an action mentions anywhere in its key.
fn store_paths(s: &Spawn) -> BTreeSet<String> {
    let texts = s
        .args
        .iter()
        .chain(s.env.values())
        .chain(s.platform.values())
        .chain(s.inputs.keys());
    let prefix = format!("{STORE_DIR}/");
    let mut out = BTreeSet::new();
    for t in texts {
        let mut rest = t.as_str();
        while let Some(i) = rest.find(&prefix) {
            let after = &rest[i + prefix.len()..];
            // Store path names are ASCII, so the byte count is a char boundary.
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
                .unwrap_or(after.len());
            if len > 0 {
                out.insert(format!("{prefix}{}", &after[..len]));
            }
            rest = &after[len..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(cc: &str, src_digest: &str, image: &str) -> Spawn {
        Spawn {
            mnemonic: "CppCompile".into(),
            target_label: "//lib:a".into(),
            args: vec![format!("{cc}/bin/c++"), "-c".into(), "a.cc".into()],
            env: BTreeMap::from([("PATH".into(), format!("{cc}/bin:/nix/store/b-busybox/bin"))]),
            inputs: BTreeMap::from([("a.cc".into(), src_digest.into())]),
            outputs: vec!["bazel-out/a.o".into()],
            platform: BTreeMap::from([("container-image".into(), image.into())]),
            digest: None,
            cache_hit: false,
        }
    }

    #[test]
    fn names_every_difference_and_the_changed_store_path() {
        let a = vec![
            spawn("/nix/store/aaa-cc", "d1/1", "i1"),
            Spawn {
                outputs: vec!["x".into()],
                ..Default::default()
            },
        ];
        let b = vec![spawn("/nix/store/bbb-cc", "d2/1", "i2")];
        let r = compare(&a, &b);
        assert_eq!((r.common, r.only_a.len(), r.only_b.len()), (1, 1, 0));
        let diffs = &r.differing[0].1;
        for want in [
            "argument 0: \"/nix/store/aaa-cc/bin/c++\" → \"/nix/store/bbb-cc/bin/c++\"",
            "environment variable PATH:",
            "input a.cc: \"d1/1\" → \"d2/1\"",
            "platform property container-image: \"i1\" → \"i2\"",
        ] {
            assert!(
                diffs.iter().any(|d| d.starts_with(want)),
                "{want} not in {diffs:?}"
            );
        }
        assert_eq!(
            r.store_paths_a,
            BTreeSet::from(["/nix/store/aaa-cc".to_string()])
        );
        assert_eq!(
            r.store_paths_b,
            BTreeSet::from(["/nix/store/bbb-cc".to_string()])
        );
    }

    #[test]
    fn identical_actions_are_not_reported() {
        let a = vec![spawn("/nix/store/aaa-cc", "d1/1", "i1")];
        let r = compare(&a, &a.clone());
        assert!(r.differing.is_empty() && r.store_paths_a.is_empty());
        assert_eq!(r.common, 1);
    }

    #[test]
    fn store_paths_are_found_anywhere_and_odd_text_is_not_a_panic() {
        let s = Spawn {
            args: vec!["/nix/store/abc-cc/bin/cc".into(), "x/nix/storeé".into()],
            env: BTreeMap::from([
                ("NIX_STORE".into(), "/nix/store".into()),
                (
                    "P".into(),
                    "/nix/store/é:/nix/store/d-e/bin:/nix/store/".into(),
                ),
            ]),
            ..Default::default()
        };
        assert_eq!(
            store_paths(&s),
            BTreeSet::from([
                "/nix/store/abc-cc".to_string(),
                "/nix/store/d-e".to_string()
            ])
        );
    }

    #[test]
    fn a_million_differences_are_listed_up_to_the_bound_and_counted() {
        let a = Spawn {
            args: (0..1_000_000).map(|i| format!("a{i}")).collect(),
            ..Default::default()
        };
        let b = Spawn {
            args: (0..1_000_000).map(|i| format!("b{i}")).collect(),
            ..Default::default()
        };
        let d = differences(&a, &b);
        assert_eq!(d.len(), MAX_DIFFERENCES + 1);
        assert_eq!(
            d.last().unwrap(),
            &format!(
                "… and {} more differences not listed",
                1_000_000 - MAX_DIFFERENCES
            )
        );
    }
}
