//! PushBlob, PushDirectory and FetchDirectory.

use std::collections::HashMap;

use bazel_remote_apis::build::bazel::remote::asset::v1 as asset;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::*;
use crate::upstream::{Reply, Upstream};
use crate::{fetch_blob, fetch_dir, loopback_config, quals, refused, sri, token_config};
use asset::fetch_client::FetchClient;
use asset::push_client::PushClient;

async fn push_blob(
    ch: &Channel,
    uri: &str,
    d: re::Digest,
    q: &[(&str, &str)],
    bearer: Option<&str>,
) -> Result<(), Status> {
    let req = asset::PushBlobRequest {
        uris: vec![uri.into()],
        qualifiers: quals(q),
        blob_digest: Some(d),
        ..Default::default()
    };
    PushClient::new(ch.clone())
        .push_blob(authed(req, bearer))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn pushed_assets_are_fetched_without_an_upstream() {
    let mut c = token_config();
    c.asset.allowed_hosts.clear(); // no downloads at all: every answer comes from memory
    let s = start(c).await;
    let ch = channel(&s).await;
    let (rw, ro) = (Some("rw-secret"), Some("ro-secret"));
    let data = blob(5000, 4);
    let uri = "https://downloads.example.com/pkg-1.0.tar.gz";
    let id = [("bazel.canonical_id", "pkg-1.0")];

    refused(
        push_blob(&ch, uri, digest(&data), &id, rw).await,
        Code::FailedPrecondition,
        "not in the CAS",
    );
    assert_eq!(
        batch_put(ch.clone(), "", &[&data], rw).await.unwrap(),
        vec![0]
    );
    refused(
        push_blob(&ch, uri, digest(&data), &id, ro).await,
        Code::PermissionDenied,
        "token \"ro\" may not push assets",
    );
    let wrong = sri(b"not it");
    refused(
        push_blob(
            &ch,
            uri,
            digest(&data),
            &[("checksum.sri", wrong.as_str())],
            rw,
        )
        .await,
        Code::InvalidArgument,
        "does not match",
    );
    push_blob(&ch, uri, digest(&data), &id, rw).await.unwrap();

    let right = sri(&data);
    let with_sri = [id[0], ("checksum.sri", right.as_str())];
    for q in [&id[..], &with_sri[..]] {
        let r = fetch_blob(&ch, &[uri.into()], q, ro).await.unwrap();
        assert_eq!(r.blob_digest, Some(digest(&data)));
    }
    // A checksum the pushed blob does not match makes the entry unusable, and then only a
    // download could help, which the config forbids.
    refused(
        fetch_blob(
            &ch,
            &[uri.into()],
            &[id[0], ("checksum.sri", wrong.as_str())],
            rw,
        )
        .await,
        Code::PermissionDenied,
        "asset.allowed_hosts is empty",
    );

    // PushDirectory: the tree must be whole in the CAS first.
    let file = b"file in a pushed tree".to_vec();
    let dir = re::Directory {
        files: vec![re::FileNode {
            name: "f".into(),
            digest: Some(digest(&file)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let raw = dir.encode_to_vec();
    let push_dir = |bearer: Option<&'static str>| {
        let req = asset::PushDirectoryRequest {
            uris: vec!["https://downloads.example.com/tree.tgz".into()],
            root_directory_digest: Some(digest(&raw)),
            ..Default::default()
        };
        let mut client = PushClient::new(ch.clone());
        async move { client.push_directory(authed(req, bearer)).await.map(|_| ()) }
    };
    assert_eq!(
        batch_put(ch.clone(), "", &[&raw], rw).await.unwrap(),
        vec![0]
    );
    refused(
        push_dir(rw).await,
        Code::FailedPrecondition,
        "not wholly in the CAS",
    );
    assert_eq!(
        batch_put(ch.clone(), "", &[&file], rw).await.unwrap(),
        vec![0]
    );
    push_dir(rw).await.unwrap();
    let req = asset::FetchDirectoryRequest {
        uris: vec!["https://downloads.example.com/tree.tgz".into()],
        ..Default::default()
    };
    let r = FetchClient::new(ch.clone())
        .fetch_directory(authed(req, ro))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.root_directory_digest, Some(digest(&raw)));
    s.shutdown().await;
}

fn targz() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let entry = |kind: tar::EntryType, mode: u32, size: usize| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size as u64);
        h
    };
    let dir = tar::EntryType::Directory;
    b.append_data(&mut entry(dir, 0o755, 0), "pkg/", &b""[..])
        .unwrap();
    b.append_data(
        &mut entry(tar::EntryType::Regular, 0o644, 6),
        "pkg/a.txt",
        &b"hello\n"[..],
    )
    .unwrap();
    let script = b"#!/bin/sh\necho hi\n";
    b.append_data(
        &mut entry(tar::EntryType::Regular, 0o755, script.len()),
        "pkg/bin/run.sh",
        &script[..],
    )
    .unwrap();
    b.append_data(&mut entry(dir, 0o755, 0), "pkg/empty/", &b""[..])
        .unwrap();
    b.append_link(
        &mut entry(tar::EntryType::Symlink, 0o777, 0),
        "pkg/link",
        "a.txt",
    )
    .unwrap();
    b.append_link(
        &mut entry(tar::EntryType::Link, 0o644, 0),
        "pkg/b.txt",
        "pkg/a.txt",
    )
    .unwrap();
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

/// Every directory under `root`, by digest, through GetTree.
async fn tree(ch: &Channel, root: &re::Digest) -> HashMap<re::Digest, re::Directory> {
    let mut s = CasClient::new(ch.clone())
        .get_tree(re::GetTreeRequest {
            root_digest: Some(root.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = HashMap::new();
    while let Some(page) = s.message().await.unwrap() {
        for d in page.directories {
            out.insert(digest(&d.encode_to_vec()), d);
        }
    }
    out
}

#[tokio::test]
async fn fetch_directory_unpacks_a_tar_gz_and_refuses_unsafe_paths() {
    let archive = targz();
    let evil = {
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        // tar's own path setters refuse "..", so the name is written raw.
        h.as_old_mut().name[..4].copy_from_slice(b"../x");
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"x"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let up = Upstream::start(|_| {
        vec![
            ("/pkg.tar.gz", Reply::Body(archive.clone())),
            ("/evil.tar", Reply::Body(evil.clone())),
        ]
    })
    .await;
    let s = start(loopback_config()).await;
    let ch = channel(&s).await;
    let uri = up.url("/pkg.tar.gz");
    let q = [("checksum.sri", sri(&archive))];
    let q: Vec<(&str, &str)> = q.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let r = fetch_dir(&ch, &uri, &q).await.unwrap();
    let root = r.root_directory_digest.unwrap();

    let dirs = tree(&ch, &root).await;
    assert_eq!(dirs.len(), 4, "root, pkg, pkg/bin, pkg/empty");
    let child = |d: &re::Directory, name: &str| {
        let n = d.directories.iter().find(|n| n.name == name).expect(name);
        dirs[n.digest.as_ref().unwrap()].clone()
    };
    let top = &dirs[&root];
    assert!(top.files.is_empty() && top.symlinks.is_empty());
    let pkg = child(top, "pkg");
    let names = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
    assert_eq!(
        pkg.files.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
        names(vec!["a.txt", "b.txt"])
    );
    assert!(pkg
        .files
        .iter()
        .all(|f| f.digest == Some(digest(b"hello\n")) && !f.is_executable));
    assert_eq!(
        pkg.directories
            .iter()
            .map(|d| d.name.clone())
            .collect::<Vec<_>>(),
        names(vec!["bin", "empty"])
    );
    assert_eq!(pkg.symlinks.len(), 1);
    assert_eq!(
        (
            pkg.symlinks[0].name.as_str(),
            pkg.symlinks[0].target.as_str()
        ),
        ("link", "a.txt")
    );
    let bin = child(&pkg, "bin");
    assert_eq!(bin.files[0].name, "run.sh");
    assert!(bin.files[0].is_executable);
    assert_eq!(bin.files[0].digest, Some(digest(b"#!/bin/sh\necho hi\n")));
    assert_eq!(child(&pkg, "empty"), re::Directory::default());
    assert!(find_missing(ch.clone(), "", vec![digest(b"hello\n")])
        .await
        .is_empty());

    // Remembered: served again without the upstream.
    assert_eq!(up.hits("/pkg.tar.gz"), 1);
    let evil_uri = up.url("/evil.tar");
    refused(
        fetch_dir(&ch, &evil_uri, &[]).await,
        Code::FailedPrecondition,
        "'..'",
    );
    refused(
        fetch_dir(&ch, &evil_uri, &[]).await,
        Code::FailedPrecondition,
        "\"../x\"",
    );
    assert_eq!(
        up.hits("/evil.tar"),
        2,
        "a refused archive is not remembered"
    );
    up.stop().await;
    let again = fetch_dir(&ch, &uri, &q).await.unwrap();
    assert_eq!(again.root_directory_digest, Some(root));
    s.shutdown().await;
}
