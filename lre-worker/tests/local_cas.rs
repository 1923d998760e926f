//! The worker's local CAS against a real lre-server: eviction keeps within its size, and
//! never takes a file an action has been promised (between `ensure` and the hard link).

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
    let server = lre_server::start(lre_server::Config::ephemeral())
        .await
        .unwrap();
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
