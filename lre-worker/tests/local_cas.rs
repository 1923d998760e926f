//! The worker's local CAS against a real lre-server: eviction keeps within its size, and
//! never takes a file an action has been promised (between `ensure` and the hard link);
//! what the server gets wrong (damaged content, being away) is reported as what it is.

mod common;

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use common::runner_env::put_blobs;
use lre_worker::cas::{digest_of, LocalCas};
use tonic::transport::Channel;

struct Env {
    _server: lre_server::RunningServer,
    cas: Arc<LocalCas>,
    _work: tempfile::TempDir,
}

/// A server holding `blobs` and a local CAS of at most `max_bytes` in front of it.
async fn env(blobs: &[Vec<u8>], max_bytes: u64) -> Env {
    env_with(lre_server::Config::ephemeral(), blobs, max_bytes).await
}

async fn env_with(config: lre_server::Config, blobs: &[Vec<u8>], max_bytes: u64) -> Env {
    let server = lre_server::start(config).await.unwrap();
    let url = format!("http://{}", server.grpc_addr);
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    put_blobs(&channel, blobs).await;
    let work = tempfile::tempdir().unwrap();
    let worker_channel = lre_worker::client::connect(
        &url,
        lre_worker::Credential::none(),
        &lre_worker::ClientTls::default(),
    )
    .unwrap();
    let cas = LocalCas::open(
        work.path().join("cas"),
        lre_worker::server_cas::ServerCas::new(worker_channel),
        max_bytes,
    )
    .await
    .unwrap();
    Env {
        _server: server,
        cas: Arc::new(cas),
        _work: work,
    }
}

fn blobs(n: usize, len: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut b = format!("blob {i} ").into_bytes();
            b.resize(len, b'.');
            b
        })
        .collect()
}

#[tokio::test]
async fn pinned_files_survive_eviction_and_unpinned_ones_go_oldest_first() {
    let data = blobs(4, 400);
    let e = env(&data, 1000).await;
    let d: Vec<re::Digest> = data.iter().map(|b| digest_of(b)).collect();
    let path = |i: usize| e.cas.path(&d[i], false).unwrap();

    let pin_a = e.cas.ensure("", &[(d[0].clone(), false)]).await.unwrap();
    let pin_bc = e
        .cas
        .ensure("", &[(d[1].clone(), false), (d[2].clone(), false)])
        .await
        .unwrap();
    // 1200 bytes against a limit of 1000, but every file is promised to an action.
    for i in 0..3 {
        assert!(path(i).exists(), "pinned blob {i} was evicted");
    }
    drop(pin_a);
    drop(pin_bc);

    let _pin_d = e.cas.ensure("", &[(d[3].clone(), false)]).await.unwrap();
    assert!(!path(0).exists(), "the oldest unpinned blob is still there");
    assert!(!path(1).exists(), "the cache stays over its limit");
    assert!(path(2).exists() && path(3).exists());
    assert_eq!(std::fs::read(path(3)).unwrap(), data[3]);
}

/// Many actions at once, each promised two of ten blobs in a cache that holds three: with
/// eviction free to run between `ensure` and the link, some action would find its input
/// gone. Every file must be there, with its content, for as long as the pin lives.
#[tokio::test]
async fn concurrent_actions_never_lose_an_input_they_were_promised() {
    let data = blobs(10, 300);
    let e = env(&data, 1000).await;
    let d: Vec<re::Digest> = data.iter().map(|b| digest_of(b)).collect();
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let cas = e.cas.clone();
        let d = d.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..40usize {
                let i = (t * 7 + round * 3) % 10;
                let j = (i + 1 + (t + round) % 9) % 10;
                let pin = cas
                    .ensure("", &[(d[i].clone(), false), (d[j].clone(), false)])
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
                for k in [i, j] {
                    let got =
                        std::fs::read(cas.path(&d[k], false).unwrap()).unwrap_or_else(|err| {
                            panic!("task {t} round {round}: promised blob {k} is gone: {err}")
                        });
                    assert_eq!(got, data[k]);
                }
                drop(pin);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // And with nothing pinned any more, the next fetch brings it back within its size.
    let _pin = e.cas.ensure("", &[(d[0].clone(), false)]).await.unwrap();
    let kept: u64 = (0..10)
        .filter_map(|k| std::fs::metadata(e.cas.path(&d[k], false).unwrap()).ok())
        .map(|m| m.len())
        .sum();
    assert!(kept <= 1000, "{kept} bytes kept in a 1000-byte cache");
}

/// The same content under a size it does not have: the cache's keys name the hash alone,
/// and a hit must not hide that the digest is wrong.
#[tokio::test]
async fn a_digest_whose_size_disagrees_with_its_content_is_refused() {
    let data = blobs(1, 100);
    let e = env(&data, 1 << 20).await;
    let d = digest_of(&data[0]);
    let _pin = e.cas.ensure("", &[(d.clone(), false)]).await.unwrap();
    let lying = re::Digest {
        size_bytes: d.size_bytes + 1,
        ..d.clone()
    };
    let err = match e.cas.ensure("", &[(lying, false)]).await {
        Err(err) => err,
        Ok(_) => panic!("a wrong size was taken for a hit"),
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains("that content is 100 bytes"),
        "{err}"
    );
}

/// A server whose stored copy went bad (no `verify_on_read`): what it sends does not hash to
/// the digest, so nothing is cached, and the error says the data is corrupt (DATA_LOSS), not
/// that the client's action is invalid or its input missing. Both paths: batch and stream.
#[tokio::test]
async fn damaged_content_from_the_server_is_data_loss_and_never_cached() {
    let store = tempfile::tempdir().unwrap();
    let mut config = lre_server::Config::ephemeral();
    config.store = lre_server::config::StoreConfig::filesystem(Some(store.path().into()), 1 << 30);
    let mut big = vec![b'x'; 3 << 20];
    big[0] = b'b';
    let data = vec![b"small input".to_vec(), big];
    let e = env_with(config, &data, 64 << 20).await;
    for blob in &data {
        let d = digest_of(blob);
        let on_disk = store.path().join("cas").join(&d.hash[..2]).join(&d.hash);
        let mut bytes = std::fs::read(&on_disk).unwrap();
        bytes[1] ^= 0x20;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&on_disk, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&on_disk, bytes).unwrap();

        let err = match e.cas.ensure("", &[(d.clone(), false)]).await {
            Err(err) => err,
            Ok(_) => panic!("damaged content of {} bytes was accepted", blob.len()),
        };
        assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
        assert!(err.to_string().contains(&d.hash), "{err}");
        assert!(
            !e.cas.path(&d, false).unwrap().exists(),
            "damaged content was cached"
        );
    }
}

/// The server going away while inputs are fetched is UNAVAILABLE (Bazel retries), never a
/// missing input (Bazel would upload it again, in vain), on the streamed path too.
#[tokio::test]
async fn an_unreachable_server_is_unavailable_not_a_missing_input() {
    let data = vec![b"small".to_vec(), vec![b'y'; 2 << 20]];
    let Env {
        _server,
        cas,
        _work,
    } = env(&data, 64 << 20).await;
    _server.shutdown().await;
    for blob in &data {
        let d = digest_of(blob);
        let err = match cas.ensure("", &[(d.clone(), false)]).await {
            Err(err) => err,
            Ok(_) => panic!("fetched from a stopped server"),
        };
        assert_eq!(
            err.code(),
            tonic::Code::Unavailable,
            "{} bytes: {err}",
            blob.len()
        );
    }
}
