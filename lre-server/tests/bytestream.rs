//! ByteStream reads and writes through a real tonic client: offsets, resumption,
//! compression, and every way an upload can go wrong without storing anything.

mod common;

use bazel_remote_apis::google::bytestream::{
    byte_stream_client::ByteStreamClient, QueryWriteStatusRequest, WriteRequest,
};
use common::*;
use tonic::Code;

#[tokio::test]
async fn large_streaming_write_then_read_with_offsets() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = blob(20 << 20, 7);
    let name = upload_name("inst", "4d1b2c2e-0000-4000-8000-000000000001", &data);
    let resp = bs_write(
        ch.clone(),
        write_requests(&name, &data, 64 * 1024, 0, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.committed_size, data.len() as i64);

    let rn = read_name("inst", &data);
    assert_eq!(bs_read(ch.clone(), &rn, 0, 0, None).await.unwrap(), data);
    assert_eq!(
        bs_read(ch.clone(), &rn, 1000, 0, None).await.unwrap(),
        &data[1000..]
    );
    assert_eq!(
        bs_read(ch.clone(), &rn, 5, 10, None).await.unwrap(),
        &data[5..15]
    );
    assert_eq!(
        bs_read(ch.clone(), &rn, data.len() as i64, 0, None)
            .await
            .unwrap(),
        Vec::<u8>::new()
    );
    let err = bs_read(ch.clone(), &rn, data.len() as i64 + 1, 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert_eq!(
        bs_read(ch.clone(), &rn, -1, 0, None)
            .await
            .unwrap_err()
            .code(),
        Code::OutOfRange
    );
    assert_eq!(
        bs_read(ch.clone(), &rn, 0, -1, None)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // Without an instance name too.
    let plain = b"no instance".to_vec();
    bs_write(
        ch.clone(),
        write_requests(&upload_name("", "u1", &plain), &plain, 4, 0, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &plain), 0, 0, None)
            .await
            .unwrap(),
        plain
    );
    s.shutdown().await;
}

#[tokio::test]
async fn blobs_resource_name_without_uploads_prefix_is_accepted() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = b"direct".to_vec();
    let name = read_name("", &data);
    bs_write(ch.clone(), write_requests(&name, &data, 3, 0, true), None)
        .await
        .unwrap();
    assert_eq!(bs_read(ch.clone(), &name, 0, 0, None).await.unwrap(), data);
    s.shutdown().await;
}

#[tokio::test]
async fn empty_blob_always_reads() {
    let s = start(memory_config()).await;
    let got = bs_read(channel(&s).await, &read_name("", b""), 0, 0, None)
        .await
        .unwrap();
    assert!(got.is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn missing_blob_is_not_found() {
    let s = start(memory_config()).await;
    let err = bs_read(channel(&s).await, &read_name("", b"absent"), 0, 0, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    s.shutdown().await;
}

#[tokio::test]
async fn interrupted_upload_resumes_after_query_write_status() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = blob(3 << 20, 11);
    let name = upload_name("", "resume-1", &data);
    let half = data.len() / 2;
    // First stream: half the data, no finish_write, then the stream ends.
    let err = bs_write(
        ch.clone(),
        write_requests(&name, &data[..half], 256 * 1024, 0, false),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let status = ByteStreamClient::new(ch.clone())
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.committed_size, half as i64);
    assert!(!status.complete);
    // Not readable until finished.
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &data), 0, 0, None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    let resp = bs_write(
        ch.clone(),
        write_requests(&name, &data, 256 * 1024, half, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.committed_size, data.len() as i64);
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &data), 0, 0, None)
            .await
            .unwrap(),
        data
    );
    let status = ByteStreamClient::new(ch.clone())
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.complete);
    assert_eq!(status.committed_size, data.len() as i64);
    s.shutdown().await;
}

#[tokio::test]
async fn write_at_the_wrong_offset_is_refused() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = blob(1000, 3);
    let name = upload_name("", "offset-1", &data);
    let err = bs_write(
        ch.clone(),
        write_requests(&name, &data, 100, 500, true),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A gap inside the stream.
    let mut reqs = write_requests(&name, &data, 100, 0, true);
    reqs[3].write_offset += 1;
    let err = bs_write(ch.clone(), reqs, None).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        find_missing(ch.clone(), "", vec![digest(&data)])
            .await
            .len()
            == 1
    );
    s.shutdown().await;
}

#[tokio::test]
async fn existing_blob_write_returns_early_with_full_size() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = blob(10_000, 5);
    batch_put(ch.clone(), "", &[&data], None).await.unwrap();
    // Send only the first chunk without finish_write: the server already has the blob.
    let name = upload_name("", "dup", &data);
    let reqs = write_requests(&name, &data[..100], 100, 0, false);
    let resp = bs_write(ch.clone(), reqs, None).await.unwrap();
    assert_eq!(resp.committed_size, data.len() as i64);
    s.shutdown().await;
}

#[tokio::test]
async fn content_that_does_not_match_its_digest_is_never_stored() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let claimed = blob(5000, 1);
    let mut actual = claimed.clone();
    actual[4000] ^= 0xff;
    let name = upload_name("", "evil", &claimed);
    let err = bs_write(
        ch.clone(),
        write_requests(&name, &actual, 1000, 0, true),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("digest mismatch"),
        "{}",
        err.message()
    );
    assert_eq!(
        find_missing(ch.clone(), "", vec![digest(&claimed), digest(&actual)])
            .await
            .len(),
        2
    );
    s.shutdown().await;
}

#[tokio::test]
async fn size_mismatches_are_refused() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = blob(1000, 2);
    let d = digest(&data);
    // More bytes than declared.
    let name = format!("uploads/x/blobs/{}/{}", d.hash, 999);
    let err = bs_write(ch.clone(), write_requests(&name, &data, 100, 0, true), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("size mismatch"), "{}", err.message());
    // Fewer bytes than declared, then finish_write: truncated.
    let name = format!("uploads/y/blobs/{}/{}", d.hash, 1001);
    let err = bs_write(ch.clone(), write_requests(&name, &data, 100, 0, true), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("1000 of 1001"), "{}", err.message());
    assert_eq!(find_missing(ch.clone(), "", vec![d.clone()]).await, vec![d]);
    s.shutdown().await;
}

#[tokio::test]
async fn huge_resource_names_are_refused_before_parsing_and_not_echoed() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let h = hash_hex(b"x");
    // 8 M slashes: parsing it cost 300 MB, and the error quoted it whole, which no client
    // accepts as a header (the caller saw an h2 protocol error, not the reason).
    for name in [
        format!("{}blobs/{h}/1", "/".repeat(8 << 20)),
        format!("{}/blobs/{h}/1", "a".repeat(5000)),
    ] {
        let err = bs_read(ch.clone(), &name, 0, 0, None).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains("longer than 4096 bytes"),
            "{}",
            err.message()
        );
        assert!(
            err.message().len() < 1024,
            "the error echoes {} bytes",
            err.message().len()
        );
        let req = WriteRequest {
            resource_name: name.clone(),
            write_offset: 0,
            finish_write: true,
            data: b"x".to_vec(),
        };
        let err = bs_write(ch.clone(), vec![req], None).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().len() < 1024);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn malformed_resource_names_are_invalid_arguments() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let h = hash_hex(b"x");
    for name in [
        "".to_string(),
        "nonsense".to_string(),
        format!("blobs/{}/1", &h[..63]),
        format!("blobs/{}/1", h.to_uppercase()),
        format!("blobs/{h}/-1"),
        format!("blobs/{h}/one"),
        format!("compressed-blobs/lz4/{h}/1"),
        format!("uploads/x/blobs/{h}"),
        format!("a/../blobs/{h}/1"),
    ] {
        let err = bs_read(ch.clone(), &name, 0, 0, None).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "read {name:?}: {err:?}");
        let req = WriteRequest {
            resource_name: name.clone(),
            write_offset: 0,
            finish_write: true,
            data: b"x".to_vec(),
        };
        let err = bs_write(ch.clone(), vec![req], None).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "write {name:?}: {err:?}");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn zstd_compressed_write_and_read() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
    let d = digest(&data);
    let compressed = zstd::bulk::compress(&data, 3).unwrap();
    let name = format!(
        "inst/uploads/z1/compressed-blobs/zstd/{}/{}",
        d.hash, d.size_bytes
    );
    // write_offset in compressed uploads counts compressed bytes after the first message.
    let resp = bs_write(
        ch.clone(),
        write_requests(&name, &compressed, 7000, 0, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.committed_size, compressed.len() as i64);
    assert_eq!(
        bs_read(ch.clone(), &read_name("inst", &data), 0, 0, None)
            .await
            .unwrap(),
        data
    );

    let rn = format!("inst/compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes);
    let got = bs_read(ch.clone(), &rn, 0, 0, None).await.unwrap();
    assert!(got.len() < data.len() / 4);
    assert_eq!(zstd::stream::decode_all(&got[..]).unwrap(), data);
    // read_offset refers to the uncompressed data.
    let got = bs_read(ch.clone(), &rn, 1_000_000, 0, None).await.unwrap();
    assert_eq!(
        zstd::stream::decode_all(&got[..]).unwrap(),
        &data[1_000_000..]
    );
    // A read_limit on a compressed read is refused, as the spec demands.
    assert_eq!(
        bs_read(ch.clone(), &rn, 0, 10, None)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // Uploading it again ends early with -1, the spec's answer for compressed uploads.
    let resp = bs_write(
        ch.clone(),
        write_requests(&name, &compressed, 7000, 0, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.committed_size, -1);
    s.shutdown().await;
}

#[tokio::test]
async fn corrupt_or_lying_zstd_uploads_store_nothing() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = b"hello hello hello hello".repeat(100);
    let d = digest(&data);
    let name = format!(
        "uploads/z2/compressed-blobs/zstd/{}/{}",
        d.hash, d.size_bytes
    );
    let garbage = vec![0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let err = bs_write(
        ch.clone(),
        write_requests(&name, &garbage, 100, 0, true),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Valid zstd of other content under this digest.
    let other = zstd::bulk::compress(b"something else entirely", 1).unwrap();
    let err = bs_write(
        ch.clone(),
        write_requests(&name, &other, 100, 0, true),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A decompression bomb claiming a small size is stopped at the declared size.
    let bomb = zstd::bulk::compress(&vec![0u8; 50 << 20], 19).unwrap();
    let small = digest(&[0u8; 10]);
    let name = format!(
        "uploads/z3/compressed-blobs/zstd/{}/{}",
        small.hash, small.size_bytes
    );
    let err = bs_write(
        ch.clone(),
        write_requests(&name, &bomb, 64 * 1024, 0, true),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(find_missing(ch.clone(), "", vec![d, small]).await.len(), 2);
    s.shutdown().await;
}

/// `data` as one zstd frame whose header asks for a window of 2^`window_log` bytes. Written
/// in pieces, so the encoder cannot shrink the window to the input's size.
fn zstd_frame(data: &[u8], window_log: u32) -> Vec<u8> {
    use std::io::Write;
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.window_log(window_log).unwrap();
    for piece in data.chunks(64 * 1024) {
        enc.write_all(piece).unwrap();
    }
    enc.finish().unwrap()
}

async fn committed(ch: tonic::transport::Channel, name: &str) -> i64 {
    ByteStreamClient::new(ch)
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .committed_size
}

#[tokio::test]
async fn zstd_frames_needing_a_window_over_8_mib_are_refused() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = blob(300_000, 21);
    let d = digest(&data);
    let name = |id: &str| {
        format!(
            "uploads/{id}/compressed-blobs/zstd/{}/{}",
            d.hash, d.size_bytes
        )
    };
    // A 128 MiB window (zstd's own default limit): its decoder would hold 128 MiB for as
    // long as the upload may be resumed.
    let wide = zstd_frame(&data, 27);
    let err = bs_write(
        ch.clone(),
        write_requests(&name("w27"), &wide, 64 * 1024, 0, true),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("window") && err.message().contains("8 MiB"),
        "{}",
        err.message()
    );
    assert_eq!(committed(ch.clone(), &name("w27")).await, 0);
    assert_eq!(find_missing(ch.clone(), "", vec![d.clone()]).await.len(), 1);
    assert_eq!(s.context.metrics.zstd_decoder_bytes.get(), 0);
    // 8 MiB, what `zstd -19` uses, is fine.
    let ok = zstd_frame(&data, 23);
    bs_write(
        ch.clone(),
        write_requests(&name("w23"), &ok, 64 * 1024, 0, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &data), 0, 0, None)
            .await
            .unwrap(),
        data
    );
    assert_eq!(s.context.metrics.zstd_decoder_bytes.get(), 0);
    s.shutdown().await;
}

#[tokio::test]
async fn interrupted_zstd_uploads_hold_bounded_decoder_memory() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = blob(1 << 20, 22);
    let d = digest(&data);
    let frame = zstd_frame(&data, 23);
    let name = |i: usize| {
        format!(
            "uploads/z-{i}/compressed-blobs/zstd/{}/{}",
            d.hash, d.size_bytes
        )
    };
    // Each interrupted upload keeps a decoder with an 8 MiB window; 40 would hold 330 MiB.
    let part = 256 * 1024;
    for i in 0..40 {
        let err = bs_write(
            ch.clone(),
            write_requests(&name(i), &frame[..part], 64 * 1024, 0, false),
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{err:?}");
        let held = s.context.metrics.zstd_decoder_bytes.get();
        assert!(held <= 256 << 20, "{held} bytes of decoders after {i}");
    }
    let held = s.context.metrics.zstd_decoder_bytes.get();
    assert!(held > 200 << 20, "{held}: the decoders were not counted");
    // The oldest made room; the newest are still resumable, and resume correctly.
    assert_eq!(committed(ch.clone(), &name(0)).await, 0);
    assert_eq!(committed(ch.clone(), &name(39)).await, part as i64);
    bs_write(
        ch.clone(),
        write_requests(&name(39), &frame, 64 * 1024, part, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &data), 0, 0, None)
            .await
            .unwrap(),
        data
    );
    s.shutdown().await;
}

#[tokio::test]
async fn interrupted_uploads_beyond_the_session_limit_make_room_oldest_first() {
    let s = start(memory_config()).await;
    let ch = channel(&s).await;
    let data = blob(1000, 23);
    for i in 0..1025 {
        let name = upload_name("", &format!("many-{i}"), &data);
        let err = bs_write(
            ch.clone(),
            write_requests(&name, &data[..10], 10, 0, false),
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{err:?}");
    }
    assert_eq!(s.context.metrics.upload_sessions.get(), 1024);
    let first = upload_name("", "many-0", &data);
    let last = upload_name("", "many-1024", &data);
    assert_eq!(committed(ch.clone(), &first).await, 0);
    assert_eq!(committed(ch.clone(), &last).await, 10);
    s.shutdown().await;
}
