//! Platform property matching: an action runs only on a worker that offers every
//! `name=value` pair the action's platform asks for.

/// Sorted `(name, value)` pairs. A worker may offer several values for one name.
pub type Properties = Vec<(String, String)>;

pub fn normalize(mut props: Properties) -> Properties {
    props.sort();
    props.dedup();
    props
}

/// The first property the action needs that `offered` lacks, if any.
pub fn first_unmet<'a>(
    offered: &[(String, String)],
    needed: &'a [(String, String)],
) -> Option<&'a (String, String)> {
    needed.iter().find(|p| offered.binary_search(p).is_err())
}

pub fn satisfies(offered: &[(String, String)], needed: &[(String, String)]) -> bool {
    first_unmet(offered, needed).is_none()
}

/// Why nothing among `candidates` can run `needed`, phrased for the user: a property no
/// candidate offers at all if there is one, else the combination.
pub fn explain_unmatchable<'a>(
    candidates: impl Iterator<Item = &'a Properties> + Clone,
    needed: &[(String, String)],
) -> String {
    let show = |p: &(String, String)| format!("{}={}", p.0, p.1);
    let all: Vec<String> = needed.iter().map(show).collect();
    if candidates.clone().next().is_none() {
        if all.is_empty() {
            return "no worker is connected or configured".into();
        }
        return format!(
            "no worker is connected or configured (the action needs {})",
            all.join(", ")
        );
    }
    for p in needed {
        if candidates.clone().all(|c| c.binary_search(p).is_err()) {
            return format!(
                "no connected or configured worker offers platform property {}",
                show(p)
            );
        }
    }
    format!(
        "no single connected or configured worker offers all of {}",
        all.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Properties {
        normalize(
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn matching_needs_every_pair() {
        let worker = p(&[("OSFamily", "Linux"), ("pool", "a"), ("pool", "b")]);
        assert!(satisfies(&worker, &p(&[])));
        assert!(satisfies(
            &worker,
            &p(&[("pool", "b"), ("OSFamily", "Linux")])
        ));
        assert_eq!(first_unmet(&worker, &p(&[("pool", "c")])).unwrap().1, "c");
        assert!(!satisfies(&worker, &p(&[("OSFamily", "Windows")])));
    }

    #[test]
    fn explanations_name_the_property() {
        let a = p(&[("pool", "a"), ("gpu", "yes")]);
        let b = p(&[("pool", "b")]);
        let both = [a, b];
        let e = explain_unmatchable(
            both.iter(),
            &p(&[("container-image", "docker://x@sha256:1")]),
        );
        assert!(e.contains("container-image=docker://x@sha256:1"), "{e}");
        let e = explain_unmatchable(both.iter(), &p(&[("pool", "b"), ("gpu", "yes")]));
        assert!(e.contains("no single"), "{e}");
        assert!(explain_unmatchable([].iter(), &p(&[("a", "b")])).contains("no worker"));
    }
}
