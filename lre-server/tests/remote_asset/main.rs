//! The Remote Asset API against a real server and a real HTTP upstream on loopback
//! (upstream.rs); pushes and directories are in directories.rs.

#[path = "../common/mod.rs"]
mod common;
mod directories;
mod upstream;

use base64::Engine as _;
use bazel_remote_apis::build::bazel::remote::asset::v1 as asset;
use common::*;
use lre_server::auth::Scope;
use lre_server::config::{ByteSize, Config};
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Status};
use upstream::{Reply, Upstream};

use asset::fetch_client::FetchClient;

fn config(hosts: &[&str], private: &[&str]) -> Config {
    let mut c = memory_config();
    c.asset.allowed_hosts = hosts.iter().map(|h| h.to_string()).collect();
    c.asset.allowed_private_ranges = private.iter().map(|p| p.parse().unwrap()).collect();
    c
}

fn loopback_config() -> Config {
    config(&["127.0.0.1"], &["127.0.0.1/32"])
}

fn sri(data: &[u8]) -> String {
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
    )
}

fn quals(q: &[(&str, &str)]) -> Vec<asset::Qualifier> {
    q.iter()
        .map(|(n, v)| asset::Qualifier {
            name: n.to_string(),
            value: v.to_string(),
        })
        .collect()
}

async fn fetch_blob(
    ch: &Channel,
    uris: &[String],
    q: &[(&str, &str)],
    bearer: Option<&str>,
) -> Result<asset::FetchBlobResponse, Status> {
    let req = asset::FetchBlobRequest {
        uris: uris.to_vec(),
        qualifiers: quals(q),
        ..Default::default()
    };
    FetchClient::new(ch.clone())
        .fetch_blob(authed(req, bearer))
        .await
        .map(|r| r.into_inner())
}

async fn fetch_dir(
    ch: &Channel,
    uri: &str,
    q: &[(&str, &str)],
) -> Result<asset::FetchDirectoryResponse, Status> {
    let req = asset::FetchDirectoryRequest {
        uris: vec![uri.to_string()],
        qualifiers: quals(q),
        ..Default::default()
    };
    FetchClient::new(ch.clone())
        .fetch_directory(req)
        .await
        .map(|r| r.into_inner())
}

#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, text: &str) {
    match r {
        Err(s) => assert!(
            s.code() == code && s.message().contains(text),
            "wanted {code:?} with {text:?}, got {s:?}"
        ),
        Ok(v) => panic!("wanted {code:?} with {text:?}, got {v:?}"),
    }
}

fn token_config() -> Config {
    let mut c = loopback_config();
    c.auth.anonymous = Scope::None;
    c.auth.tokens = vec![
        token("rw", "rw-secret", Scope::ReadWrite, None),
        token("ro", "ro-secret", Scope::Read, None),
    ];
    c
}

#[tokio::test]
async fn fetch_blob_stores_verifies_and_remembers() {
    let data = blob(50_000, 7);
    let up = Upstream::start(|_| vec![("/file", Reply::Body(data.clone()))]).await;
    let s = start(loopback_config()).await;
    let ch = channel(&s).await;
    let uris = [up.url("/file")];
    let q = [
        ("checksum.sri", sri(&data)),
        ("bazel.canonical_id", "id-1".to_string()),
    ];
    let q: Vec<(&str, &str)> = q.iter().map(|(n, v)| (*n, v.as_str())).collect();

    let r = fetch_blob(&ch, &uris, &q, None).await.unwrap();
    assert_eq!(r.blob_digest, Some(digest(&data)));
    assert_eq!(r.uri, uris[0]);
    assert_eq!(r.status.unwrap().code, 0);
    assert!(find_missing(ch.clone(), "", vec![digest(&data)])
        .await
        .is_empty());
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &data), 0, 0, None)
            .await
            .unwrap(),
        data
    );
    assert_eq!(up.hits("/file"), 1);

    // From memory: no second request, and none possible once the upstream is gone.
    fetch_blob(&ch, &uris, &q, None).await.unwrap();
    assert_eq!(up.hits("/file"), 1);
    up.stop().await;
    let r = fetch_blob(&ch, &uris, &q, None).await.unwrap();
    assert_eq!(r.blob_digest, Some(digest(&data)));
    // Without the checksum the same entry serves too; another canonical id is another
    // asset, and content older than oldest_content_accepted is not served: both need the
    // (now closed) upstream.
    fetch_blob(&ch, &uris, &q[1..], None).await.unwrap();
    refused(
        fetch_blob(&ch, &uris, &[("bazel.canonical_id", "id-2")], None).await,
        Code::Unavailable,
        &uris[0],
    );
    let mut req = asset::FetchBlobRequest {
        uris: uris.to_vec(),
        qualifiers: quals(&q),
        ..Default::default()
    };
    req.oldest_content_accepted = Some(bazel_remote_apis::google::protobuf::Timestamp {
        seconds: 4_000_000_000,
        nanos: 0,
    });
    refused(
        FetchClient::new(ch.clone()).fetch_blob(req).await,
        Code::Unavailable,
        "",
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_wrong_checksum_stores_nothing() {
    let data = blob(20_000, 8);
    let up = Upstream::start(|_| vec![("/file", Reply::Body(data.clone()))]).await;
    let s = start(loopback_config()).await;
    let ch = channel(&s).await;
    let uris = [up.url("/file")];
    let wrong = sri(b"something else");
    refused(
        fetch_blob(&ch, &uris, &[("checksum.sri", wrong.as_str())], None).await,
        Code::InvalidArgument,
        "checksum mismatch",
    );
    assert_eq!(up.hits("/file"), 1);
    assert_eq!(
        find_missing(ch.clone(), "", vec![digest(&data)]).await,
        vec![digest(&data)]
    );
    // Nothing remembered either: the next try goes upstream again.
    refused(
        fetch_blob(&ch, &uris, &[("checksum.sri", wrong.as_str())], None).await,
        Code::InvalidArgument,
        &wrong,
    );
    assert_eq!(up.hits("/file"), 2);
    up.stop().await;
    s.shutdown().await;
}

#[tokio::test]
async fn unknown_qualifiers_are_invalid_arguments() {
    use tonic_types::StatusExt;
    let up = Upstream::start(|_| vec![("/file", Reply::Body(b"x".to_vec()))]).await;
    let s = start(loopback_config()).await;
    let ch = channel(&s).await;
    let e = fetch_blob(
        &ch,
        &[up.url("/file")],
        &[("resource_type", "application/x-git")],
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("resource_type"), "{e:?}");
    let bad = e.get_details_bad_request().expect("a BadRequest detail");
    assert_eq!(bad.field_violations[0].field, "qualifiers.name");
    refused(
        fetch_blob(
            &ch,
            &[up.url("/file")],
            &[("http_header:Authorization", "Bearer x")],
            None,
        )
        .await,
        Code::InvalidArgument,
        "credentials",
    );
    assert_eq!(up.total(), 0);
    up.stop().await;
    s.shutdown().await;
}

#[tokio::test]
async fn hosts_outside_the_allow_list_get_no_request() {
    let up = Upstream::start(|_| vec![("/file", Reply::Body(b"x".to_vec()))]).await;
    // The default: downloads off.
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    refused(
        fetch_blob(&ch, &[up.url("/file")], &[], None).await,
        Code::PermissionDenied,
        "asset.allowed_hosts is empty",
    );
    s.shutdown().await;
    let s = start(config(
        &["mirror.example.com", "*.example.org"],
        &["127.0.0.1/32"],
    ))
    .await;
    let ch = channel(&s).await;
    refused(
        fetch_blob(&ch, &[up.url("/file")], &[], None).await,
        Code::PermissionDenied,
        "host 127.0.0.1 is not in asset.allowed_hosts",
    );
    refused(
        fetch_blob(&ch, &["file:///etc/passwd".into()], &[], None).await,
        Code::PermissionDenied,
        "scheme",
    );
    assert_eq!(up.total(), 0);
    up.stop().await;
    s.shutdown().await;
}

#[tokio::test]
async fn private_addresses_are_refused_literal_or_resolved() {
    let up = Upstream::start(|_| vec![("/file", Reply::Body(b"x".to_vec()))]).await;
    let s = start(config(&["127.0.0.1", "localhost", "*"], &[])).await;
    let ch = channel(&s).await;
    refused(
        fetch_blob(&ch, &[up.url("/file")], &[], None).await,
        Code::PermissionDenied,
        "loopback (127.0.0.0/8); list it in asset.allowed_private_ranges",
    );
    // Issue 21, defect 8: the refusal named the address the name resolved to, which made
    // the server a DNS oracle for its own network. It says why, not where.
    let by_name = format!("http://localhost:{}/file", up.addr.port());
    let r = fetch_blob(&ch, &[by_name], &[], None).await;
    refused(
        r.clone(),
        Code::PermissionDenied,
        "localhost resolves only to addresses downloads may not reach",
    );
    let m = r.unwrap_err().message().to_string();
    assert!(!m.contains("127.0.0.1") && !m.contains("::1"), "{m}");
    refused(
        fetch_blob(
            &ch,
            &["http://169.254.169.254/latest/meta-data/".into()],
            &[],
            None,
        )
        .await,
        Code::PermissionDenied,
        "link-local",
    );
    refused(
        fetch_blob(&ch, &["http://[::ffff:10.0.0.1]/".into()], &[], None).await,
        Code::PermissionDenied,
        "private (10.0.0.0/8)",
    );
    assert_eq!(up.total(), 0);
    up.stop().await;
    s.shutdown().await;
}

#[tokio::test]
async fn every_redirect_hop_is_checked() {
    let data = b"redirected content".to_vec();
    let up = Upstream::start(|addr| {
        let port = addr.port();
        vec![
            ("/file", Reply::Body(data.clone())),
            (
                "/hop",
                Reply::Redirect(format!("http://localhost:{port}/file")),
            ),
            (
                "/away",
                Reply::Redirect(format!("http://elsewhere.example:{port}/file")),
            ),
            ("/private", Reply::Redirect("http://10.1.2.3/file".into())),
            ("/loop", Reply::Redirect("/loop".into())),
        ]
    })
    .await;
    let hosts = ["127.0.0.1", "localhost", "10.1.2.3"];
    let s = start(config(&hosts, &["127.0.0.0/8", "::1/128"])).await;
    let ch = channel(&s).await;
    let r = fetch_blob(&ch, &[up.url("/hop")], &[], None).await.unwrap();
    assert_eq!(r.blob_digest, Some(digest(&data)));
    assert_eq!(up.hits("/file"), 1);
    refused(
        fetch_blob(&ch, &[up.url("/away")], &[], None).await,
        Code::PermissionDenied,
        "redirect to http://elsewhere.example",
    );
    refused(
        fetch_blob(&ch, &[up.url("/private")], &[], None).await,
        Code::PermissionDenied,
        "10.1.2.3 is private",
    );
    refused(
        fetch_blob(&ch, &[up.url("/loop")], &[], None).await,
        Code::PermissionDenied,
        "more than 5 redirects",
    );
    assert_eq!(up.hits("/loop"), 6);
    assert_eq!(up.hits("/file"), 1);
    up.stop().await;
    s.shutdown().await;
}

/// Issue 21, defect 8: `http_header:` qualifiers of any name (X-Api-Key, Private-Token)
/// were re-sent after a redirect to another host. They now go only to the host they were
/// given for; a redirect within that host keeps them.
#[tokio::test]
async fn client_headers_never_follow_a_redirect_to_another_host() {
    let data = b"behind a redirect".to_vec();
    let up = Upstream::start(|addr| {
        let port = addr.port();
        vec![
            ("/file", Reply::Body(data.clone())),
            ("/other", Reply::Body(data.clone())),
            ("/same", Reply::Redirect("/other".into())),
            (
                "/away",
                Reply::Redirect(format!("http://localhost:{port}/file")),
            ),
        ]
    })
    .await;
    let s = start(config(
        &["127.0.0.1", "localhost"],
        &["127.0.0.0/8", "::1/128"],
    ))
    .await;
    let ch = channel(&s).await;
    let q = [
        ("http_header:X-Api-Key", "s3cret"),
        ("http_header:Private-Token", "t0ken"),
    ];
    let r = fetch_blob(&ch, &[up.url("/same")], &q, None).await.unwrap();
    assert_eq!(r.blob_digest, Some(digest(&data)));
    assert_eq!(up.header("/same", "x-api-key").as_deref(), Some("s3cret"));
    assert_eq!(
        up.header("/other", "x-api-key").as_deref(),
        Some("s3cret"),
        "a redirect within the host keeps them"
    );
    let r = fetch_blob(&ch, &[up.url("/away")], &q, None).await.unwrap();
    assert_eq!(r.blob_digest, Some(digest(&data)));
    assert_eq!(
        up.header("/away", "private-token").as_deref(),
        Some("t0ken")
    );
    assert_eq!(up.hits("/file"), 1, "the redirect was followed");
    assert_eq!(
        up.header("/file", "x-api-key"),
        None,
        "sent to another host"
    );
    assert_eq!(
        up.header("/file", "private-token"),
        None,
        "sent to another host"
    );
    up.stop().await;
    s.shutdown().await;
}

/// Issue 21, defect 3: a FetchBlob listing one remembered URI many times, with a checksum
/// the blob does not match, hashed the blob once per URI (100 URIs: 83 times the CPU).
#[tokio::test]
async fn a_blob_named_by_many_uris_is_hashed_once_per_request() {
    let data = blob(200_000, 9);
    let up = Upstream::start(|_| vec![("/file", Reply::Body(data.clone()))]).await;
    let s = start(loopback_config()).await;
    let ch = channel(&s).await;
    let uri = up.url("/file");
    fetch_blob(&ch, std::slice::from_ref(&uri), &[], None)
        .await
        .unwrap();
    // Reads of CAS blobs that found them, as the server's own metrics count them.
    let reads = || {
        s.context
            .metrics
            .cas_lookups
            .get_or_create(&lre_server::metrics::ResultLabel { result: "hit" })
            .get()
    };
    let before = reads();
    let uris = vec![uri; 100];
    // A SHA-384 the remembered blob does not have: each URI's memory is checked against it.
    let wrong = format!("sha384-{}", "A".repeat(64));
    let r = fetch_blob(&ch, &uris, &[("checksum.sri", &wrong)], None).await;
    assert!(r.is_err(), "a wrong checksum is never served: {r:?}");
    let hashed = reads() - before;
    assert!(
        hashed <= 3,
        "the blob was read {hashed} times for one request"
    );
    up.stop().await;
    s.shutdown().await;
}

#[tokio::test]
async fn downloads_over_the_size_limit_store_nothing() {
    let (big, streamed) = (blob(10_000, 1), blob(10_000, 2));
    let up = Upstream::start(|_| {
        vec![
            ("/big", Reply::Body(big.clone())),
            ("/streamed", Reply::Chunked(streamed.clone())),
            ("/small", Reply::Chunked(b"fits".to_vec())),
        ]
    })
    .await;
    let mut c = loopback_config();
    c.asset.max_download_bytes = ByteSize(4096);
    let s = start(c).await;
    let ch = channel(&s).await;
    for path in ["/big", "/streamed"] {
        refused(
            fetch_blob(&ch, &[up.url(path)], &[], None).await,
            Code::FailedPrecondition,
            "larger than asset.max_download_bytes (4096 bytes)",
        );
    }
    let missing = find_missing(ch.clone(), "", vec![digest(&big), digest(&streamed)]).await;
    assert_eq!(missing.len(), 2);
    let r = fetch_blob(&ch, &[up.url("/small")], &[], None)
        .await
        .unwrap();
    assert_eq!(r.blob_digest, Some(digest(b"fits")));
    up.stop().await;
    s.shutdown().await;
}

#[tokio::test]
async fn read_only_callers_get_remembered_content_but_trigger_no_download() {
    let data = blob(3000, 3);
    let up = Upstream::start(|_| vec![("/file", Reply::Body(data.clone()))]).await;
    let s = start(token_config()).await;
    let ch = channel(&s).await;
    let uris = [up.url("/file")];
    refused(
        fetch_blob(&ch, &uris, &[], Some("ro-secret")).await,
        Code::PermissionDenied,
        "token \"ro\" may not make the server download it",
    );
    refused(
        fetch_blob(&ch, &uris, &[], None).await,
        Code::Unauthenticated,
        "",
    );
    assert_eq!(up.total(), 0);
    fetch_blob(&ch, &uris, &[], Some("rw-secret"))
        .await
        .unwrap();
    let r = fetch_blob(&ch, &uris, &[], Some("ro-secret"))
        .await
        .unwrap();
    assert_eq!(r.blob_digest, Some(digest(&data)));
    assert_eq!(up.total(), 1);
    up.stop().await;
    s.shutdown().await;
}

#[tokio::test]
async fn oversized_requests_are_refused_and_long_errors_still_arrive() {
    let s = start(loopback_config()).await;
    let ch = channel(&s).await;
    // Nothing listens on port 1: each download fails at once, naming its URI.
    let long = |i: usize| format!("http://127.0.0.1:1/{i}/{}", "a".repeat(8000));
    let e = fetch_blob(&ch, &[long(0) + &"b".repeat(20_000)], &[], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("at most 8192") && e.message().len() < 1000,
        "{e:?}"
    );
    let many: Vec<String> = (0..101)
        .map(|i| format!("http://127.0.0.1:1/{i}"))
        .collect();
    refused(
        fetch_blob(&ch, &many, &[], None).await,
        Code::InvalidArgument,
        "101 URIs given; at most 100",
    );
    // Three long URIs that all fail: the joined error would exceed what gRPC clients
    // accept in a header (16 KiB here, 8 KiB in Bazel's grpc-java); it arrives cut short.
    let uris: Vec<String> = (0..3).map(long).collect();
    let e = fetch_blob(&ch, &uris, &[], None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("all 3 URIs failed") && e.message().len() < 5000,
        "{} bytes: {:.200}",
        e.message().len(),
        e.message()
    );
    s.shutdown().await;
}
