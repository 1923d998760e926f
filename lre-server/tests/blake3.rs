//! BLAKE3 as a second digest function (REAPI 2.3's `digest_function`), through a real
//! tonic client and HTTP: every cache RPC round-trips under BLAKE3, the two namespaces
//! never mix (same bytes, same hash: different blobs and different action results), a
//! blob whose bytes do not hash to its name under its function is refused and stores
//! nothing, and the filesystem store finds BLAKE3 blobs again after a restart. Remote
//! execution speaks SHA-256 only and says so.

mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream::byte_stream_client::ByteStreamClient;
use bazel_remote_apis::google::bytestream::QueryWriteStatusRequest;
use common::*;
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

const BLAKE3: i32 = re::digest_function::Value::Blake3 as i32;
const SHA256: i32 = re::digest_function::Value::Sha256 as i32;

fn b3(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: blake3::hash(data).to_hex().to_string(),
        size_bytes: data.len() as i64,
    }
}

async fn missing(ch: &Channel, function: i32, digests: Vec<re::Digest>) -> Vec<re::Digest> {
    CasClient::new(ch.clone())
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: digests,
            digest_function: function,
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner()
        .missing_blob_digests
}

async fn batch_update(
    ch: &Channel,
    function: i32,
    entries: Vec<(re::Digest, Vec<u8>, i32)>,
) -> Vec<i32> {
    CasClient::new(ch.clone())
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: entries
                .into_iter()
                .map(
                    |(d, data, compressor)| re::batch_update_blobs_request::Request {
                        digest: Some(d),
                        data,
                        compressor,
                    },
                )
                .collect(),
            digest_function: function,
        })
        .await
        .expect("BatchUpdateBlobs")
        .into_inner()
        .responses
        .iter()
        .map(|r| r.status.as_ref().map_or(-1, |s| s.code))
        .collect()
}

async fn batch_read(ch: &Channel, function: i32, digests: Vec<re::Digest>) -> Vec<(i32, Vec<u8>)> {
    CasClient::new(ch.clone())
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests,
            acceptable_compressors: vec![],
            digest_function: function,
        })
        .await
        .expect("BatchReadBlobs")
        .into_inner()
        .responses
        .into_iter()
        .map(|r| (r.status.map_or(-1, |s| s.code), r.data))
        .collect()
}

/// Stores `result` for `action` under BLAKE3, at the root instance.
async fn ac_update(ch: &Channel, action: &re::Digest, result: re::ActionResult) {
    ActionCacheClient::new(ch.clone())
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(result),
            digest_function: BLAKE3,
            ..Default::default()
        })
        .await
        .expect("UpdateActionResult");
}

async fn ac_lookup(
    ch: &Channel,
    function: i32,
    action: &re::Digest,
) -> Result<re::ActionResult, tonic::Status> {
    ActionCacheClient::new(ch.clone())
        .get_action_result(ac_get(function, action))
        .await
        .map(|r| r.into_inner())
}

fn ac_get(function: i32, action: &re::Digest) -> re::GetActionResultRequest {
    re::GetActionResultRequest {
        instance_name: String::new(),
        action_digest: Some(action.clone()),
        digest_function: function,
        ..Default::default()
    }
}

/// Every cache RPC under BLAKE3, on a memory and on a filesystem store, and the
/// filesystem store's BLAKE3 blobs and results after a restart.
#[tokio::test]
async fn every_cache_rpc_round_trips_under_blake3_and_the_namespaces_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    for config in [memory_config(), fs_config(dir.path(), 1 << 30)] {
        let s = start(config).await;
        let ch = channel(&s).await;
        round_trips(&s, &ch).await;
        s.shutdown().await;
    }
    // The filesystem store lists BLAKE3 blobs at start as it does SHA-256 ones.
    let s = start(fs_config(dir.path(), 1 << 30)).await;
    let ch = channel(&s).await;
    let a = b"alpha under blake3".to_vec();
    assert!(
        missing(&ch, BLAKE3, vec![b3(&a)]).await.is_empty(),
        "kept over a restart"
    );
    assert_eq!(
        missing(&ch, SHA256, vec![digest(&a)]).await,
        vec![digest(&a)]
    );
    let action = b3(b"an action");
    let got = ac_lookup(&ch, BLAKE3, &action)
        .await
        .expect("the BLAKE3 action result is kept over a restart");
    assert_eq!(got.exit_code, 7);
    s.shutdown().await;
}

async fn round_trips(s: &lre_server::RunningServer, ch: &Channel) {
    // Capabilities: the cache speaks both, execution SHA-256 only.
    let caps = CapabilitiesClient::new(ch.clone())
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        caps.cache_capabilities.unwrap().digest_functions,
        vec![SHA256, BLAKE3]
    );
    assert_eq!(
        caps.execution_capabilities.unwrap().digest_functions,
        vec![SHA256]
    );

    let a = b"alpha under blake3".to_vec();
    let b = blob(200_000, 3);
    let c = vec![b'c'; 50_000];
    // The empty blob always exists, under either function.
    assert_eq!(
        missing(ch, BLAKE3, vec![b3(&a), b3(&b), b3(b"")]).await,
        vec![b3(&a), b3(&b)]
    );

    // BatchUpdateBlobs, one entry zstd-compressed; then FindMissing and BatchRead.
    let zstd = re::compressor::Value::Zstd as i32;
    let cz = zstd::bulk::compress(&c, 3).unwrap();
    assert_eq!(
        batch_update(
            ch,
            BLAKE3,
            vec![
                (b3(&a), a.clone(), 0),
                (b3(&b), b.clone(), 0),
                (b3(&c), cz, zstd)
            ]
        )
        .await,
        vec![0, 0, 0]
    );
    assert!(missing(ch, BLAKE3, vec![b3(&a), b3(&b), b3(&c)])
        .await
        .is_empty());
    let read = batch_read(ch, BLAKE3, vec![b3(&a), b3(&b), b3(&c)]).await;
    assert_eq!(read, vec![(0, a.clone()), (0, b.clone()), (0, c.clone())]);
    // Namespaces: the same bytes under SHA-256 are not stored, and a BLAKE3 hash asked
    // for as a SHA-256 one is not found.
    assert_eq!(
        missing(ch, SHA256, vec![digest(&a)]).await,
        vec![digest(&a)]
    );
    assert_eq!(missing(ch, 0, vec![b3(&a)]).await, vec![b3(&a)]);
    let read = batch_read(ch, SHA256, vec![b3(&a)]).await;
    assert_eq!(read[0].0, Code::NotFound as i32);

    // A batch entry whose bytes do not hash to its BLAKE3 name (here: named by its
    // SHA-256) is refused and stores nothing.
    let d = b"named by the wrong function".to_vec();
    let lie = re::Digest {
        hash: hash_hex(&d),
        size_bytes: d.len() as i64,
    };
    assert_eq!(
        batch_update(ch, BLAKE3, vec![(lie.clone(), d.clone(), 0)]).await,
        vec![Code::InvalidArgument as i32]
    );
    assert_eq!(
        missing(ch, BLAKE3, vec![lie.clone()]).await,
        vec![lie.clone()]
    );
    assert_eq!(missing(ch, SHA256, vec![lie.clone()]).await, vec![lie]);

    // ByteStream: a 3 MiB write in 64 KiB messages under `blobs/blake3/`, its status,
    // and reads of it whole and from an offset; its name without the function is a
    // SHA-256 name, and finds nothing.
    let big = blob(3 << 20, 9);
    let bd = b3(&big);
    let up = format!("uploads/u1/blobs/blake3/{}/{}", bd.hash, bd.size_bytes);
    let w = bs_write(
        ch.clone(),
        write_requests(&up, &big, 64 << 10, 0, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(w.committed_size, big.len() as i64);
    let status = ByteStreamClient::new(ch.clone())
        .query_write_status(QueryWriteStatusRequest {
            resource_name: up.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.complete);
    let name = format!("blobs/blake3/{}/{}", bd.hash, bd.size_bytes);
    assert_eq!(bs_read(ch.clone(), &name, 0, 0, None).await.unwrap(), big);
    assert_eq!(
        bs_read(ch.clone(), &name, 1 << 20, 100, None)
            .await
            .unwrap(),
        big[1 << 20..(1 << 20) + 100]
    );
    let as_sha = format!("blobs/{}/{}", bd.hash, bd.size_bytes);
    let e = bs_read(ch.clone(), &as_sha, 0, 0, None).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // An interrupted BLAKE3 upload resumes where QueryWriteStatus says.
    let r = blob(1 << 20, 11);
    let rd = b3(&r);
    let rname = format!("uploads/u9/blobs/blake3/{}/{}", rd.hash, rd.size_bytes);
    let half = write_requests(&rname, &r[..512 << 10], 64 << 10, 0, false);
    let _ = bs_write(ch.clone(), half, None).await;
    let status = ByteStreamClient::new(ch.clone())
        .query_write_status(QueryWriteStatusRequest {
            resource_name: rname.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!status.complete);
    let at = status.committed_size as usize;
    assert!(at > 0 && at <= 512 << 10, "{at}");
    let rest = write_requests(&rname, &r, 64 << 10, at, true);
    let w = bs_write(ch.clone(), rest, None).await.unwrap();
    assert_eq!(w.committed_size, r.len() as i64);
    assert!(missing(ch, BLAKE3, vec![rd.clone()]).await.is_empty());

    // A compressed write under BLAKE3.
    let z = blob(100_000, 4);
    let zd = b3(&z);
    let zname = format!(
        "uploads/u2/compressed-blobs/zstd/blake3/{}/{}",
        zd.hash, zd.size_bytes
    );
    let compressed = zstd::bulk::compress(&z, 3).unwrap();
    bs_write(
        ch.clone(),
        write_requests(&zname, &compressed, 10_000, 0, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        bs_read(
            ch.clone(),
            &format!("blobs/blake3/{}/{}", zd.hash, zd.size_bytes),
            0,
            0,
            None
        )
        .await
        .unwrap(),
        z
    );
    // Bytes whose SHA-256 is the name, written under `blake3/`: refused, nothing stored.
    let t = blob(300_000, 5);
    let td = digest(&t);
    let tname = format!("uploads/u3/blobs/blake3/{}/{}", td.hash, td.size_bytes);
    let e = bs_write(
        ch.clone(),
        write_requests(&tname, &t, 64 << 10, 0, true),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert_eq!(
        missing(ch, BLAKE3, vec![td.clone()]).await,
        vec![td.clone()]
    );
    assert_eq!(missing(ch, SHA256, vec![td.clone()]).await, vec![td]);

    // GetTree: a root with one child directory, all named by BLAKE3.
    let leaf = re::Directory {
        files: vec![re::FileNode {
            name: "a".into(),
            digest: Some(b3(&a)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let leaf_raw = leaf.encode_to_vec();
    let root = re::Directory {
        directories: vec![re::DirectoryNode {
            name: "sub".into(),
            digest: Some(b3(&leaf_raw)),
        }],
        ..Default::default()
    };
    let root_raw = root.encode_to_vec();
    assert_eq!(
        batch_update(
            ch,
            BLAKE3,
            vec![
                (b3(&leaf_raw), leaf_raw.clone(), 0),
                (b3(&root_raw), root_raw.clone(), 0)
            ]
        )
        .await,
        vec![0, 0]
    );
    let mut tree = CasClient::new(ch.clone())
        .get_tree(re::GetTreeRequest {
            root_digest: Some(b3(&root_raw)),
            digest_function: BLAKE3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut dirs = Vec::new();
    while let Some(page) = tree.message().await.unwrap() {
        dirs.extend(page.directories);
    }
    assert_eq!(dirs, vec![root.clone(), leaf]);
    // Under SHA-256 the root is not there: the walk finds nothing.
    let mut tree = CasClient::new(ch.clone())
        .get_tree(re::GetTreeRequest {
            root_digest: Some(b3(&root_raw)),
            digest_function: SHA256,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut none = Vec::new();
    while let Some(page) = tree.message().await.unwrap() {
        none.extend(page.directories);
    }
    assert!(none.is_empty());

    // The action cache: a result whose outputs are BLAKE3 blobs, stored and served under
    // BLAKE3 only; the same action hash under SHA-256 is another action.
    let action = b3(b"an action");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(b3(&a)),
            ..Default::default()
        }],
        stdout_digest: Some(b3(&c)),
        exit_code: 7,
        ..Default::default()
    };
    ac_update(ch, &action, result.clone()).await;
    assert_eq!(ac_lookup(ch, BLAKE3, &action).await.unwrap(), result);
    let e = ac_lookup(ch, SHA256, &action).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // A BLAKE3 result whose output exists only under SHA-256 is incomplete: not served.
    let only_sha = b"stored under sha256 only".to_vec();
    assert_eq!(
        batch_put(ch.clone(), "", &[&only_sha], None).await.unwrap(),
        vec![0]
    );
    let other = b3(b"another action");
    let incomplete = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(b3(&only_sha)),
            ..Default::default()
        }],
        ..Default::default()
    };
    ac_update(ch, &other, incomplete).await;
    let e = ac_lookup(ch, BLAKE3, &other).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Output directories: a BLAKE3 Tree whose file is a BLAKE3 blob makes a complete
    // result; the same Tree naming a file stored only under SHA-256 does not.
    for (file, complete) in [(a.clone(), true), (only_sha.clone(), false)] {
        let tree = re::Tree {
            root: Some(re::Directory {
                files: vec![re::FileNode {
                    name: "f".into(),
                    digest: Some(b3(&file)),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        }
        .encode_to_vec();
        assert_eq!(
            batch_update(ch, BLAKE3, vec![(b3(&tree), tree.clone(), 0)]).await,
            vec![0]
        );
        let with_dir = b3(format!("an action with a directory, {complete}").as_bytes());
        let result = re::ActionResult {
            output_directories: vec![re::OutputDirectory {
                path: "d".into(),
                tree_digest: Some(b3(&tree)),
                ..Default::default()
            }],
            ..Default::default()
        };
        ac_update(ch, &with_dir, result).await;
        let got = ac_lookup(ch, BLAKE3, &with_dir).await;
        assert_eq!(got.is_ok(), complete, "{got:?}");
    }

    // A digest function this server does not speak is refused by name.
    let e = CasClient::new(ch.clone())
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![b3(&a)],
            digest_function: re::digest_function::Value::Sha1 as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("SHA1"), "{e}");

    http_round_trips(s, &a, &action, &result).await;
}

/// The HTTP protocol names BLAKE3 in the path (`cas/blake3/<hash>`) or in an
/// `X-Digest-Function` header, and shares blobs and results with gRPC.
async fn http_round_trips(
    s: &lre_server::RunningServer,
    a: &[u8],
    action: &re::Digest,
    result: &re::ActionResult,
) {
    let http = reqwest::Client::new();
    let url = http_url(s);
    let a_hash = blake3::hash(a).to_hex().to_string();
    // Stored over gRPC, read over HTTP, by path and by header.
    let got = http
        .get(format!("{url}/cas/blake3/{a_hash}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(&got.bytes().await.unwrap()[..], a);
    let got = http
        .get(format!("{url}/cas/{a_hash}"))
        .header("X-Digest-Function", "BLAKE3")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    // Without either it is a SHA-256 hash: not found.
    let got = http
        .get(format!("{url}/cas/{a_hash}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 404);
    // Path and header disagreeing, or an unknown function: refused.
    let got = http
        .get(format!("{url}/cas/blake3/{a_hash}"))
        .header("X-Digest-Function", "sha256")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 400);
    let got = http
        .get(format!("{url}/cas/md5/{a_hash}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 400);

    // PUT under BLAKE3, then read over gRPC; a body that is not the name's refused.
    let p = b"put over http under blake3".to_vec();
    let p_hash = blake3::hash(&p).to_hex().to_string();
    let put = http
        .put(format!("{url}/cas/blake3/{p_hash}"))
        .body(p.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let ch = channel(s).await;
    assert_eq!(
        batch_read(&ch, BLAKE3, vec![b3(&p)]).await,
        vec![(0, p.clone())]
    );
    let bad = http
        .put(format!("{url}/cas/blake3/{}", hash_hex(b"other bytes")))
        .body(b"other bytes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        missing(&ch, BLAKE3, vec![digest(b"other bytes")])
            .await
            .len(),
        1,
        "nothing stored"
    );

    // The action cache: gRPC's BLAKE3 result over HTTP, and not under SHA-256.
    let got = http
        .get(format!("{url}/ac/blake3/{}", action.hash))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let served = re::ActionResult::decode(got.bytes().await.unwrap()).unwrap();
    assert_eq!(&served, result);
    let got = http
        .get(format!("{url}/ac/{}", action.hash))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 404);

    // PUT by header, an action result PUT under BLAKE3, and an instance in the path.
    let q = b"put by header".to_vec();
    let q_hash = blake3::hash(&q).to_hex().to_string();
    let put = http
        .put(format!("{url}/team/cas/{q_hash}"))
        .header("X-Digest-Function", "blake3")
        .body(q.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let got = http
        .get(format!("{url}/team/cas/blake3/{q_hash}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(&got.bytes().await.unwrap()[..], &q[..]);
    let http_action = blake3::hash(b"an action put over http")
        .to_hex()
        .to_string();
    let stored = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "q".into(),
            digest: Some(b3(&q)),
            ..Default::default()
        }],
        exit_code: 3,
        ..Default::default()
    };
    let put = http
        .put(format!("{url}/team/ac/blake3/{http_action}"))
        .body(stored.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let got = ActionCacheClient::new(ch.clone())
        .get_action_result(re::GetActionResultRequest {
            instance_name: "team".into(),
            action_digest: Some(re::Digest {
                hash: http_action.clone(),
                size_bytes: 1,
            }),
            digest_function: BLAKE3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, stored);
    let got = http
        .get(format!("{url}/team/ac/{http_action}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 404, "not a SHA-256 action");
}

/// Remote execution hashes inputs and outputs with SHA-256 only, and so does the Remote
/// Asset API: a BLAKE3 Execute or FetchBlob is refused by name (Capabilities says so too
/// for execution), not run under the wrong function.
#[tokio::test]
async fn remote_execution_and_remote_asset_refuse_blake3_by_name() {
    use bazel_remote_apis::build::bazel::remote::asset::v1 as asset;
    let mut config = memory_config();
    config.execution.enabled = true;
    let s = start(config).await;
    let ch = channel(&s).await;
    let e = asset::fetch_client::FetchClient::new(ch.clone())
        .fetch_blob(asset::FetchBlobRequest {
            uris: vec!["http://127.0.0.1:9/x".into()],
            digest_function: BLAKE3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("Remote Asset speaks SHA256 only"),
        "{e}"
    );
    let mut client = re::execution_client::ExecutionClient::new(ch);
    let e = client
        .execute(re::ExecuteRequest {
            action_digest: Some(b3(b"an action")),
            digest_function: BLAKE3,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("remote execution speaks SHA256 only"),
        "{e}"
    );
    s.shutdown().await;
}

/// A miss of a BLAKE3 build is explained from its BLAKE3 blobs: the Command and the input
/// tree an Action names are under the Action's function (read as SHA-256 they were "not in
/// the CAS", and nothing was compared).
#[tokio::test]
async fn a_miss_of_a_blake3_build_is_explained_from_its_blake3_blobs() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    for (invocation, variant) in [("base-build", "-O1"), ("new-build", "-O2")] {
        let source = format!(
            "int main() {{ return {}; }}",
            variant.len() + variant.as_bytes()[2] as usize
        );
        let root = re::Directory {
            files: vec![re::FileNode {
                name: "main.c".into(),
                digest: Some(b3(source.as_bytes())),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let command = re::Command {
            arguments: vec!["cc".into(), variant.into(), "main.c".into()],
            output_paths: vec!["main.o".into()],
            ..Default::default()
        }
        .encode_to_vec();
        let action = re::Action {
            command_digest: Some(b3(&command)),
            input_root_digest: Some(b3(&root)),
            ..Default::default()
        }
        .encode_to_vec();
        let blobs = [source.into_bytes(), root, command, action.clone()];
        assert_eq!(
            batch_update(
                &ch,
                BLAKE3,
                blobs.iter().map(|b| (b3(b), b.clone(), 0)).collect()
            )
            .await,
            vec![0; 4]
        );
        let mut req = tonic::Request::new(ac_get(BLAKE3, &b3(&action)));
        let meta = re::RequestMetadata {
            tool_invocation_id: invocation.into(),
            action_mnemonic: "CppCompile".into(),
            target_id: "//:main".into(),
            ..Default::default()
        };
        req.metadata_mut().insert_bin(
            "build.bazel.remote.execution.v2.requestmetadata-bin",
            tonic::metadata::MetadataValue::from_bytes(&meta.encode_to_vec()),
        );
        let e = ActionCacheClient::new(ch.clone())
            .get_action_result(req)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let url = format!("{}/api/explain?base=base-build&new=new-build", http_url(&s));
    let body = reqwest::get(url).await.unwrap().text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["unexplained"], serde_json::json!([]), "{v}");
    let differences = v["differing"][0]["differences"].to_string();
    assert!(differences.contains("-O2"), "{v}");
    assert!(
        differences.contains("main.c"),
        "the inputs were compared: {v}"
    );
    s.shutdown().await;
}
