//! What the status page and its API take from a URL and its headers: the explanation's
//! query (`?instance=&base=&new=`, decoded as axum decodes it) and the choice of the two
//! invocations it compares, the provenance API's `writer=`, and the HTTP port's judgement
//! of a `Host` name. None may panic; a chosen pair is two invocations of the list, of one
//! instance; a host served without TLS is an address, `localhost` or a configured name.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lre_server::activity::InvocationSummary;
use lre_server::http::HostPolicy;
use lre_server::status::page::{choose, ExplainQuery};

#[derive(Arbitrary, Debug)]
struct Input {
    query: String,
    host: String,
    writer: String,
    /// (instance index, id, misses) of each invocation, newest first.
    invocations: Vec<(u8, String, u8)>,
}

const INSTANCES: [&str; 3] = ["", "main", "a/b"];

fuzz_target!(|input: Input| {
    let list: Vec<InvocationSummary> = input
        .invocations
        .iter()
        .take(16)
        .enumerate()
        .map(|(i, (inst, id, misses))| InvocationSummary {
            instance: INSTANCES[*inst as usize % INSTANCES.len()].into(),
            id: id.clone(),
            caller: String::new(),
            correlated: String::new(),
            tool: String::new(),
            first_seen_ms: 0,
            last_seen_ms: 0,
            // Newest first, as the snapshot lists them.
            sequence: 1000 - i as u64,
            hits: 0,
            misses: u64::from(*misses % 3),
            executed: 0,
            failed: 0,
            dropped: 0,
        })
        .collect();
    if let Ok(q) = serde_urlencoded::from_str::<ExplainQuery>(&input.query) {
        if let Ok((instance, base, new)) = choose(&list, &q) {
            let find = |id: &str| list.iter().find(|i| i.id == id && i.instance == instance);
            let (b, n) = (find(&base), find(&new));
            assert!(
                b.is_some() && n.is_some(),
                "{q:?} chose {instance:?} {base:?} {new:?}"
            );
            if q.instance.is_some() && q.new.is_none() {
                assert_eq!(Some(&instance), q.instance.as_ref());
            }
        }
    }
    let _ = input.writer.parse::<lre_store::ac_entry::Writer>();
    let names = vec!["cache.example.com".to_string()];
    let plain = HostPolicy {
        tls: false,
        names: names.clone(),
    };
    if plain.serves(&input.host) {
        let h = input.host.to_ascii_lowercase();
        let name = h
            .trim_start_matches('[')
            .split([']', ':'])
            .next()
            .unwrap_or("")
            .trim_end_matches('.');
        let bare = h.rsplit_once(':').map_or(h.as_str(), |(n, _)| n);
        assert!(
            h.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .parse::<std::net::IpAddr>()
                .is_ok()
                || bare.parse::<std::net::IpAddr>().is_ok()
                || h.parse::<std::net::IpAddr>().is_ok()
                || name == "localhost"
                || name.ends_with(".localhost")
                || name == "cache.example.com",
            "{:?} was served",
            input.host
        );
    }
    assert!(HostPolicy { tls: true, names }.serves(&input.host));
});
