//! `[store] verify_on_read`: a blob whose file on disk no longer matches its digest is never
//! served; it is deleted and reads as NOT_FOUND, so clients upload it again. A real filesystem
//! store behind real ByteStream and CAS services on a loopback port.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::content_addressable_storage_server::ContentAddressableStorageServer;
use bazel_remote_apis::google::bytestream::byte_stream_server::ByteStreamServer;
use common::*;
use lre_server::auth::Authenticator;
use lre_server::bytestream::ByteStreamService;
use lre_server::cas::CasService;
use lre_server::context::ServerContext;
use lre_server::instance::Instances;
use lre_server::metrics::Metrics;
use lre_server::store::{FsOptions, FsStore};
use tonic::transport::Channel;
use tonic::Code;

/// Serves ByteStream and CAS over a filesystem store in `dir`; returns a connected channel.
async fn serve(dir: &Path, verify_on_read: bool) -> Channel {
    serve_with(dir, verify_on_read, false).await
}

/// `layer`: the filesystem store under the generic `verify` layer.
async fn serve_with(dir: &Path, verify_on_read: bool, layer: bool) -> Channel {
    let metrics = Arc::new(Metrics::new());
    let store = FsStore::open_with(
        dir.to_path_buf(),
        1 << 30,
        metrics.store.clone(),
        FsOptions {
            verify_on_read,
            ..FsOptions::default()
        },
    )
    .await
    .unwrap();
    let mut store: Arc<dyn lre_server::store::BlobStore> = Arc::new(store);
    if layer {
        store = Arc::new(lre_server::store::VerifyStore::new(store));
    }
    let cache = Arc::new(ServerContext {
        action_results: lre_server::context::checked_results(
            store.clone(),
            store.clone(),
            metrics.clone(),
        ),
        store,
        metrics,
        instances: Instances::new(None),
        auth: Authenticator::open(),
        max_batch_total_size_bytes: 16 << 20,
        activity: lre_server::activity::Activity::new(Default::default()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .add_service(
            ByteStreamServer::new(ByteStreamService::new(
                cache.clone(),
                Duration::from_secs(600),
            ))
            .max_decoding_message_size(16 << 20),
        )
        .add_service(ContentAddressableStorageServer::new(CasService::new(cache)));
    tokio::spawn(router.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// BatchReadBlobs of `blobs`: each one's status code.
async fn batch_read_codes(ch: &Channel, blobs: &[&[u8]]) -> Vec<i32> {
    CasClient::new(ch.clone())
        .batch_read_blobs(
            bazel_remote_apis::build::bazel::remote::execution::v2::BatchReadBlobsRequest {
                instance_name: String::new(),
                digests: blobs.iter().map(|b| digest(b)).collect(),
                acceptable_compressors: vec![],
                digest_function: 0,
            },
        )
        .await
        .unwrap()
        .into_inner()
        .responses
        .iter()
        .map(|r| r.status.as_ref().map_or(0, |s| s.code))
        .collect()
}

fn blob_path(dir: &Path, data: &[u8]) -> PathBuf {
    let h = hash_hex(data);
    dir.join("cas").join(&h[..2]).join(h)
}

/// Flips one byte in the middle: same size, other content, as bit rot would.
fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    // Committed files are read-only: as a disk fault would, keep the mode (and work for a
    // user other than root).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, mode).unwrap();
}

async fn upload(ch: &Channel, data: &[u8], id: &str) {
    let name = upload_name("", id, data);
    bs_write(
        ch.clone(),
        write_requests(&name, data, 1 << 20, 0, true),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_corrupted_blob_is_not_served_but_removed_so_clients_upload_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let ch = serve(dir.path(), true).await;
    let good = blob(3 << 20, 1);
    let bad = blob(3 << 20, 2);
    upload(&ch, &good, "good").await;
    upload(&ch, &bad, "bad").await;
    let path = blob_path(dir.path(), &bad);
    corrupt(&path);

    let err = bs_read(ch.clone(), &read_name("", &bad), 0, 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(!path.exists(), "the corrupt file is still in the store");
    assert_eq!(
        find_missing(ch.clone(), "", vec![digest(&bad)]).await.len(),
        1
    );
    // The intact blob is served, from any offset.
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &good), 1 << 20, 0, None)
            .await
            .unwrap(),
        good[1 << 20..]
    );
    // Uploaded again, it is served again; damaged again, BatchReadBlobs refuses it too.
    upload(&ch, &bad, "bad-again").await;
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &bad), 0, 0, None)
            .await
            .unwrap(),
        bad
    );
    corrupt(&path);
    assert_eq!(
        batch_read_codes(&ch, &[&bad, &good]).await,
        vec![Code::NotFound as i32, Code::Ok as i32]
    );
    assert!(!path.exists());
}

#[tokio::test]
async fn without_verify_on_read_the_same_damage_is_served() {
    // What the option protects against: the default trusts the disk.
    let dir = tempfile::tempdir().unwrap();
    let ch = serve(dir.path(), false).await;
    let bad = blob(1 << 20, 3);
    upload(&ch, &bad, "bad").await;
    corrupt(&blob_path(dir.path(), &bad));
    let got = bs_read(ch.clone(), &read_name("", &bad), 0, 0, None)
        .await
        .unwrap();
    assert_eq!(got.len(), bad.len());
    assert_ne!(got, bad);
}

/// The generic `verify` layer (for stores like S3 that cannot check before serving), over a
/// filesystem store without `verify_on_read`, behind the real services: a blob damaged in
/// place is never streamed whole (the ByteStream read ends in DATA_LOSS), BatchReadBlobs
/// says NOT_FOUND, and the copy is removed so the next upload repairs it.
#[tokio::test]
async fn the_verify_layer_never_serves_a_damaged_blob_whole() {
    let dir = tempfile::tempdir().unwrap();
    let ch = serve_with(dir.path(), false, true).await;
    let good = blob(3 << 20, 4);
    let bad = blob(3 << 20, 5);
    upload(&ch, &good, "good").await;
    upload(&ch, &bad, "bad").await;
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &good), 1 << 20, 0, None)
            .await
            .unwrap(),
        good[1 << 20..]
    );
    let path = blob_path(dir.path(), &bad);
    corrupt(&path);
    let err = bs_read(ch.clone(), &read_name("", &bad), 0, 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    let mut removed = false;
    for _ in 0..100 {
        if !path.exists() {
            removed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(removed, "the damaged file is removed");

    upload(&ch, &bad, "bad-again").await;
    corrupt(&path);
    assert_eq!(
        batch_read_codes(&ch, &[&bad, &good]).await,
        vec![Code::NotFound as i32, Code::Ok as i32]
    );
}
