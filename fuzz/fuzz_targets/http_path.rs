//! The HTTP cache's path parser (`/[instance/]ac|cas/<sha256>`): a bad path is a 404 or a
//! 400, never a panic; a good one means what its canonical spelling means.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lre_server::error::Error;
use lre_server::http::{parse_path, Kind};

/// `@` in an input stands for a valid hash.
const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn check(path: &str) {
    match parse_path(path) {
        Ok((instance, kind, hash)) => {
            let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let k = match kind {
                Kind::Ac => "ac",
                Kind::Cas => "cas",
            };
            assert_eq!(segs[segs.len() - 1], hex::encode(hash), "{path:?}");
            assert_eq!(segs[segs.len() - 2], k, "{path:?}");
            assert!(
                !instance.starts_with('/'),
                "{path:?}: instance {instance:?}"
            );
            assert!(path.contains(&instance), "{path:?}: instance {instance:?}");
            let canonical = match instance.is_empty() {
                true => format!("/{k}/{}", hex::encode(hash)),
                false => format!("/{instance}/{k}/{}", hex::encode(hash)),
            };
            let again = parse_path(&canonical).ok();
            assert!(
                again == Some((instance, kind, hash)),
                "{path:?} vs {canonical:?}"
            );
        }
        Err(e) => assert!(
            matches!(e, Error::NotFound(_) | Error::InvalidArgument(_)),
            "{path:?}: {e}"
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    check(path);
    if path.contains('@') {
        check(&path.replace('@', H));
    }
});
