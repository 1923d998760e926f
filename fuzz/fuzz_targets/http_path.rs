//! The HTTP cache's path parser (`/[instance/]ac|cas/[blake3/]<hash>`): a bad path is a 404 or a
//! 400, never a panic; a good one means what its canonical spelling means.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lre_server::error::Error;
use lre_server::http::{parse_path, Kind};

/// `@` in an input stands for a valid hash.
const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn check(path: &str) {
    match parse_path(path) {
        Ok(p) => {
            let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let k = match p.kind {
                Kind::Ac => "ac",
                Kind::Cas => "cas",
            };
            let n = segs.len();
            assert_eq!(segs[n - 1], hex::encode(p.hash), "{path:?}");
            match p.function {
                None => assert_eq!(segs[n - 2], k, "{path:?}"),
                Some(f) => {
                    assert_eq!(segs[n - 2], f.name(), "{path:?}");
                    assert_eq!(segs[n - 3], k, "{path:?}");
                }
            }
            assert!(
                !p.instance.starts_with('/'),
                "{path:?}: instance {:?}",
                p.instance
            );
            assert!(
                path.contains(&p.instance),
                "{path:?}: instance {:?}",
                p.instance
            );
            let canonical = p.canonical();
            let again = parse_path(&canonical).ok();
            assert!(again.as_ref() == Some(&p), "{path:?} vs {canonical:?}");
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
        // `#` stands for a function's segment.
        check(&path.replace('@', H).replace('#', "blake3"));
    }
});
