//! CAS, ActionCache and Capabilities through a real tonic client.

mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use common::*;
use prost::Message;
use tonic::Code;

#[tokio::test]
async fn capabilities_advertise_what_is_served() {
    let s = start(memory_config()).await;
    let caps = CapabilitiesClient::new(channel(&s).await)
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(
        cache.digest_functions,
        vec![
            re::digest_function::Value::Sha256 as i32,
            re::digest_function::Value::Blake3 as i32
        ]
    );
    assert!(cache
        .supported_compressors
        .contains(&(re::compressor::Value::Zstd as i32)));
    assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    // No execution service in this server: Bazel must not be told otherwise.
    assert!(!caps.execution_capabilities.unwrap().exec_enabled);
    let (lo, hi) = (
        caps.low_api_version.unwrap(),
        caps.high_api_version.unwrap(),
    );
    assert_eq!((lo.major, lo.minor), (2, 0));
    assert!(hi.major == 2 && hi.minor >= lo.minor);
    s.shutdown().await;
}

#[tokio::test]
async fn batch_update_find_missing_and_read() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let (a, b) = (b"alpha".to_vec(), blob(100_000, 1));
    let missing = find_missing(ch.clone(), "", vec![digest(&a), digest(&b), digest(b"")]).await;
    // The empty blob always exists.
    assert_eq!(missing.len(), 2);
    assert_eq!(
        batch_put(ch.clone(), "", &[&a, &b], None).await.unwrap(),
        vec![0, 0]
    );
    assert!(find_missing(ch.clone(), "", vec![digest(&a), digest(&b)])
        .await
        .is_empty());
    // Same hash, wrong size: a different digest, so missing.
    let mut wrong = digest(&a);
    wrong.size_bytes += 1;
    assert_eq!(
        find_missing(ch.clone(), "", vec![wrong.clone()]).await,
        vec![wrong]
    );

    let resp = CasClient::new(ch.clone())
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![digest(&a), digest(b"never stored"), digest(b"")],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].data, a);
    assert_eq!(
        resp.responses[1].status.as_ref().unwrap().code,
        Code::NotFound as i32
    );
    assert_eq!(resp.responses[2].status.as_ref().unwrap().code, 0);
    assert!(resp.responses[2].data.is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn batch_compression_round_trips() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = b"compress me ".repeat(1000);
    let z = re::compressor::Value::Zstd as i32;
    let resp = CasClient::new(ch.clone())
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(digest(&data)),
                data: zstd::bulk::compress(&data, 3).unwrap(),
                compressor: z,
            }],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    let read = CasClient::new(ch.clone())
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![digest(&data)],
            acceptable_compressors: vec![z],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let r = &read.responses[0];
    assert_eq!(r.compressor, z);
    assert!(r.data.len() < data.len());
    assert_eq!(zstd::bulk::decompress(&r.data, data.len()).unwrap(), data);
    s.shutdown().await;
}

#[tokio::test]
async fn batch_rejects_bad_entries_and_stores_nothing_for_them() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let good = b"good".to_vec();
    let evil = b"evil".to_vec();
    let mut lie = digest(b"claimed");
    lie.size_bytes = evil.len() as i64;
    let mut short = digest(&good);
    short.size_bytes = 3;
    let resp = CasClient::new(ch.clone())
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![
                re::batch_update_blobs_request::Request {
                    digest: Some(digest(&good)),
                    data: good.clone(),
                    compressor: 0,
                },
                re::batch_update_blobs_request::Request {
                    digest: Some(lie.clone()),
                    data: evil.clone(),
                    compressor: 0,
                },
                re::batch_update_blobs_request::Request {
                    digest: Some(short.clone()),
                    data: good.clone(),
                    compressor: 0,
                },
            ],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(
        codes,
        vec![
            0,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32
        ]
    );
    assert!(resp.responses[1]
        .status
        .as_ref()
        .unwrap()
        .message
        .contains("digest mismatch"));
    assert_eq!(
        find_missing(ch.clone(), "", vec![lie.clone(), short.clone()])
            .await
            .len(),
        2
    );
    s.shutdown().await;
}

#[tokio::test]
async fn malformed_digests_and_oversized_batches_are_invalid_arguments() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    for (hash, size) in [
        ("abc".to_string(), 1),
        ("z".repeat(64), 1),
        ("A".repeat(64), 1),
        ("a".repeat(64), -5),
    ] {
        let err = CasClient::new(ch.clone())
            .find_missing_blobs(re::FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: vec![re::Digest {
                    hash: hash.clone(),
                    size_bytes: size,
                }],
                digest_function: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{hash}/{size}: {err:?}");
    }
    // Four 1.5 MiB blobs exceed the 4 MiB batch limit; none may be stored.
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| blob(1_500_000, i)).collect();
    let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    let err = batch_put(ch.clone(), "", &refs, None).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_batch_total_size_bytes"),
        "{}",
        err.message()
    );
    assert_eq!(
        find_missing(ch.clone(), "", blobs.iter().map(|b| digest(b)).collect())
            .await
            .len(),
        4
    );
    // A SHA-1 request is refused rather than misread.
    let err = CasClient::new(ch.clone())
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![],
            digest_function: re::digest_function::Value::Sha1 as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    s.shutdown().await;
}

#[tokio::test]
async fn get_tree_pages_through_every_directory() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    // root -> {d0..d4}, each d_i -> shared leaf (listed once).
    let leaf = re::Directory {
        files: vec![re::FileNode {
            name: "f".into(),
            digest: Some(digest(b"x")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let leaf_raw = leaf.encode_to_vec();
    let mids: Vec<Vec<u8>> = (0..5)
        .map(|i| {
            re::Directory {
                directories: vec![re::DirectoryNode {
                    name: format!("leaf{i}"),
                    digest: Some(digest(&leaf_raw)),
                }],
                symlinks: vec![re::SymlinkNode {
                    name: format!("s{i}"),
                    target: "x".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect();
    let root = re::Directory {
        directories: mids
            .iter()
            .enumerate()
            .map(|(i, m)| re::DirectoryNode {
                name: format!("d{i}"),
                digest: Some(digest(m)),
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut all: Vec<&[u8]> = vec![&root, &leaf_raw];
    all.extend(mids.iter().map(|m| m.as_slice()));
    batch_put(ch.clone(), "", &all, None).await.unwrap();

    let mut token = String::new();
    let mut seen = Vec::new();
    let mut calls = 0;
    loop {
        let mut stream = CasClient::new(ch.clone())
            .get_tree(re::GetTreeRequest {
                instance_name: String::new(),
                root_digest: Some(digest(&root)),
                page_size: 2,
                page_token: token.clone(),
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner();
        calls += 1;
        // Take one page per call to exercise the token.
        let page = stream.message().await.unwrap().unwrap();
        assert!(page.directories.len() <= 2);
        seen.extend(page.directories.iter().map(|d| d.encode_to_vec()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 7, "root + 5 mids + 1 shared leaf");
    assert_eq!(seen[0], root);
    assert_eq!(calls, 4);
    s.shutdown().await;
}

#[tokio::test]
async fn action_results_are_returned_only_when_complete() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let action = digest(b"action-1");
    let (out, stdout) = (b"output bytes".to_vec(), b"stdout text".to_vec());
    // Directory output: a Tree whose file must also be present.
    let inner_file = b"file inside tree".to_vec();
    let tree = re::Tree {
        root: Some(re::Directory {
            files: vec![re::FileNode {
                name: "a".into(),
                digest: Some(digest(&inner_file)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    let mut result = action_result(&out, &stdout);
    result.output_directories.push(re::OutputDirectory {
        path: "out/dir".into(),
        tree_digest: Some(digest(&tree)),
        ..Default::default()
    });
    // What a result references is decided when it is written: its output Trees must be in
    // the CAS by then (Bazel and lre's workers upload outputs first).
    let e = update_ac(ch.clone(), "", &action, result.clone(), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("\"out/dir\""), "{}", e.message());
    assert_eq!(
        get_ac(ch.clone(), "", &action, None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    batch_put(ch.clone(), "", &[&tree], None).await.unwrap();
    update_ac(ch.clone(), "", &action, result.clone(), None)
        .await
        .unwrap();
    // The outputs are not there yet.
    assert_eq!(
        get_ac(ch.clone(), "", &action, None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    batch_put(ch.clone(), "", &[&out, &stdout], None)
        .await
        .unwrap();
    // The tree is there but a file inside it is not.
    assert_eq!(
        get_ac(ch.clone(), "", &action, None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    batch_put(ch.clone(), "", &[&inner_file], None)
        .await
        .unwrap();
    let got = get_ac(ch.clone(), "", &action, None).await.unwrap();
    assert_eq!(got, result);
    s.shutdown().await;
}

#[tokio::test]
async fn instances_have_separate_action_caches() {
    let mut cfg = memory_config();
    cfg.instances = Some(vec!["".into(), "a".into(), "b/c".into()]);
    let s = start(cfg).await;
    let ch = channel(&s).await;
    let action = digest(b"shared action");
    let (out, stdout) = (b"o".to_vec(), b"s".to_vec());
    batch_put(ch.clone(), "a", &[&out, &stdout], None)
        .await
        .unwrap();
    update_ac(ch.clone(), "a", &action, action_result(&out, &stdout), None)
        .await
        .unwrap();
    assert!(get_ac(ch.clone(), "a", &action, None).await.is_ok());
    assert_eq!(
        get_ac(ch.clone(), "b/c", &action, None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        get_ac(ch.clone(), "", &action, None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let err = get_ac(ch.clone(), "nope", &action, None).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown instance"),
        "{}",
        err.message()
    );
    s.shutdown().await;
}

#[tokio::test]
async fn malformed_action_results_are_refused() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let action = digest(b"a");
    let mut bad = action_result(b"o", b"s");
    bad.output_files[0].digest = Some(re::Digest {
        hash: "xyz".into(),
        size_bytes: 1,
    });
    let err = update_ac(ch.clone(), "", &action, bad, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = ActionCacheClient::new(ch.clone())
        .get_action_result(re::GetActionResultRequest {
            instance_name: String::new(),
            action_digest: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    s.shutdown().await;
}

#[tokio::test]
async fn malformed_protobuf_is_rejected_cleanly() {
    // Send raw bytes that are not a valid FindMissingBlobsRequest via a byte-passthrough codec.
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
    );
    // Field 2 (blob_digests) declared as a length-delimited field of 100 bytes, then truncated.
    let garbage = vec![0x12u8, 100, 1, 2, 3];
    let err = grpc
        .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(garbage), path, RawCodec)
        .await
        .unwrap_err();
    // tonic rejects it before our handler runs; what matters is a clear error, not a crash.
    assert!(err.message().contains("decode"), "{err:?}");
    // The server is unharmed.
    assert!(find_missing(ch.clone(), "", vec![]).await.is_empty());
    s.shutdown().await;
}

/// Passes bytes through unchanged, so a test can put arbitrary bytes on the wire.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}
