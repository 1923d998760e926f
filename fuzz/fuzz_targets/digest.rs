//! Digest parsing: the server's `Digest::parse`/`parse_hash`/`from_proto` (URLs, resource
//! names, protos) under either digest function, and the worker's check of the digests it
//! is sent. Input: `hash/size`.
#![no_main]

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use libfuzzer_sys::fuzz_target;
use lre_server::digest::{Digest, DigestFunction};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (hash, size) = s.split_once('/').unwrap_or((s, "0"));
    let lower_hex =
        hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let any_hex = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    let n = size.parse::<i64>();

    let h = Digest::parse_hash(hash);
    assert_eq!(h.is_ok(), lower_hex, "parse_hash({hash:?})");
    if let Ok(h) = h {
        assert_eq!(hex::encode(h), hash);
    }

    // Which function a digest is parsed under changes nothing about what parses.
    let function = if size.len() % 2 == 0 {
        DigestFunction::Sha256
    } else {
        DigestFunction::Blake3
    };
    match Digest::parse(function, hash, size) {
        Ok(d) => {
            assert_eq!(d.function, function);
            assert!(lower_hex && matches!(n, Ok(v) if v >= 0), "{s:?} accepted");
            assert_eq!(d.hex(), hash);
            assert_eq!(Ok(d.size as i64), n);
            match function {
                DigestFunction::Sha256 => assert_eq!(d.to_string(), format!("{hash}/{}", d.size)),
                f => assert_eq!(d.to_string(), format!("{f}:{hash}/{}", d.size)),
            }
            assert_eq!(
                Digest::parse(function, &d.hex(), &d.size.to_string()).unwrap(),
                d
            );
            let p = d.to_proto();
            assert_eq!(Digest::from_proto(function, &p).unwrap(), d);
            assert_eq!(Digest::from_opt_proto(function, &Some(p)).unwrap(), Some(d));
            assert_eq!(d.is_empty_blob(), d == Digest::empty(function));
            // The other function's digest of the same hash and size is another digest.
            for other in DigestFunction::ALL {
                assert_eq!(d == d.with_function(other), other == function);
            }
        }
        Err(_) => assert!(!lower_hex || !matches!(n, Ok(v) if v >= 0), "{s:?} refused"),
    }

    // The same hash in a proto, with any size: the worker accepts exactly what the server
    // accepts (one rule, from lre-store: 64 lowercase hex digits and a size of at least 0).
    let size_bytes = n.unwrap_or_else(|_| -(size.len() as i64));
    let proto = re::Digest {
        hash: hash.to_string(),
        size_bytes,
    };
    let server = Digest::from_proto(DigestFunction::Sha256, &proto);
    let worker = lre_worker::cas::valid(&proto);
    assert_eq!(server.is_ok(), lower_hex && size_bytes >= 0, "{proto:?}");
    assert_eq!(worker.is_ok(), server.is_ok(), "{proto:?}");
    // Uppercase hex, which the worker used to accept, is refused by both.
    if any_hex && !lower_hex {
        assert!(worker.is_err(), "{proto:?}");
    }

    let f = size_bytes as i32;
    // Unset (0), SHA256 (1) and BLAKE3 (9) are spoken; nothing else.
    let blake3 = re::digest_function::Value::Blake3 as i32;
    assert_eq!(
        DigestFunction::from_request(f).is_ok(),
        f == 0 || f == 1 || f == blake3,
        "digest function {f}"
    );
});
