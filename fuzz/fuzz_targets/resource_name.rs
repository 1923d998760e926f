//! ByteStream resource names (`lre_server::resource_name`): never a panic, and every name
//! accepted means what its canonical spelling means, digest function included
//! (`blobs/blake3/{hash}/{size}`; SHA-256 is spelled without one).
#![no_main]

use std::fmt::Write as _;

use libfuzzer_sys::fuzz_target;
use lre_server::digest::DigestFunction;
use lre_server::instance::validate_name;
use lre_server::resource_name::{
    parse_read, parse_write, BlobResource, Compression, MAX_RESOURCE_NAME,
};

/// `@` in an input stands for a valid hash, so mutations reach the parts after the hash.
const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn canonical(r: &BlobResource) -> String {
    let mut s = String::new();
    if !r.instance.is_empty() {
        s.push_str(&r.instance);
        s.push('/');
    }
    if let Some(id) = &r.upload_id {
        write!(s, "uploads/{id}/").unwrap();
    }
    s.push_str(match r.compression {
        Compression::Identity => "blobs",
        Compression::Zstd => "compressed-blobs/zstd",
    });
    if r.digest.function != DigestFunction::Sha256 {
        write!(s, "/{}", r.digest.function.name()).unwrap();
    }
    write!(s, "/{}/{}", r.digest.hex(), r.digest.size).unwrap();
    s
}

fn check(name: &str) {
    let read = parse_read(name);
    let write = parse_write(name);
    if name.len() > MAX_RESOURCE_NAME {
        assert!(
            read.is_err() && write.is_err(),
            "an over-long name was accepted"
        );
    }
    if let Ok(r) = &read {
        assert_eq!(r.upload_id, None, "{name:?}: a read name has no upload id");
        // What a client may read it may also write under the same name.
        assert_eq!(
            write.as_ref().ok(),
            Some(r),
            "{name:?}: read and write disagree"
        );
    }
    if let Ok(w) = &write {
        assert!(
            validate_name(&w.instance).is_ok(),
            "{name:?}: bad instance accepted"
        );
        assert!(
            name.contains(&w.digest.hex()),
            "{name:?}: the hash is not the name's"
        );
        // A function other than SHA-256 is only ever one the name spells out, before the
        // hash.
        if w.digest.function != DigestFunction::Sha256 {
            let spelled = format!("/{}/{}/", w.digest.function.name(), w.digest.hex());
            assert!(
                name.contains(&spelled),
                "{name:?}: function {}",
                w.digest.function
            );
        }
        if let Some(id) = &w.upload_id {
            assert!(
                !id.is_empty() && !id.contains('/'),
                "{name:?}: upload id {id:?}"
            );
        }
        let c = canonical(w);
        assert_eq!(parse_write(&c).ok().as_ref(), Some(w), "{name:?} vs {c:?}");
        if w.upload_id.is_none() {
            assert_eq!(parse_read(&c).ok().as_ref(), Some(w), "{name:?} vs {c:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    check(name);
    if name.contains('@') {
        check(&name.replace('@', H));
        // `#` stands for a function's segment, so both namespaces are reached.
        check(&name.replace('@', H).replace('#', "blake3"));
    }
});
