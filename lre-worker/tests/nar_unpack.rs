//! The worker's NAR unpacker against the real `nix-store --dump`: a tree unpacked from
//! the NAR Nix wrote dumps back to exactly that NAR, in any chunking, with Nix's modes.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use lre_nix_formats::NixHash;
use lre_worker::nar_unpack::{remove_tree, Unpack};

fn dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("nix-store (is nix-bin installed?)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn an_unpacked_tree_dumps_back_to_the_same_nar() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("tree");
    std::fs::create_dir_all(t.join("bin")).unwrap();
    std::fs::create_dir_all(t.join("share/empty")).unwrap();
    std::fs::write(t.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(t.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(t.join("empty"), b"").unwrap();
    std::fs::write(t.join("big"), vec![0x5au8; 3 << 20]).unwrap();
    symlink("../big", t.join("bin/link")).unwrap();
    symlink("/etc/passwd", t.join("abs")).unwrap();
    let nar = dump(&t);
    let store = d.path().join("store");
    std::fs::create_dir(&store).unwrap();

    for chunk in [1 << 20, 4093, 7] {
        let dest = store.join(format!("p-{chunk}"));
        let mut u = Unpack::new(&dest, NixHash::of(&nar), nar.len() as u64);
        for c in nar.chunks(chunk) {
            u.feed(c).unwrap();
        }
        u.finish().unwrap();
        assert_eq!(dump(&dest), nar, "chunk {chunk}");
        let mode = |p: &str| {
            std::fs::symlink_metadata(dest.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(
            (mode("bin/tool"), mode("big"), mode("bin"), mode(".")),
            (0o555, 0o444, 0o555, 0o555)
        );
        // The link is a link, as written, never followed.
        assert_eq!(
            std::fs::read_link(dest.join("abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        remove_tree(&dest);
        assert!(!dest.exists());
    }
    // Nothing but the destinations was ever written next to them.
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);

    // A truncated NAR is refused at the end and leaves nothing.
    let dest = store.join("short");
    let mut u = Unpack::new(&dest, NixHash::of(&nar), nar.len() as u64);
    u.feed(&nar[..nar.len() / 2]).unwrap();
    assert!(u.finish().unwrap_err().to_string().contains("truncated"));
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
}
