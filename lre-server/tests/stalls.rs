//! ByteStream calls whose client stops, and writes that fail at their start: neither may
//! hold a file, disk space or an upload session beyond a bound.

mod common;

use std::time::Duration;

use bazel_remote_apis::google::bytestream::{
    byte_stream_client::ByteStreamClient, QueryWriteStatusRequest, ReadRequest, WriteRequest,
};
use common::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Files this process (the in-process server) holds open whose path contains `needle`.
fn open_files_named(needle: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|target| target.to_string_lossy().contains(needle))
                .count()
        })
        .unwrap_or(0)
}

/// Polls `cond` for up to 30 s (a bound against hanging, not a timing assertion).
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..300 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cond()
}

#[tokio::test]
async fn a_read_whose_client_stops_reading_is_ended_and_its_file_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fs_config(dir.path(), 1 << 30);
    config.connections.stream_stall_timeout_seconds = 1;
    let s = start(config).await;
    let ch = channel(&s).await;
    // Far more than the server's channel, HTTP/2 windows and socket buffers hold, so the
    // server's sender really waits on the client.
    let data = blob(48 << 20, 41);
    let name = upload_name("", "7e0d6a1c-0000-4000-8000-000000000041", &data);
    bs_write(
        ch.clone(),
        write_requests(&name, &data, 1 << 20, 0, true),
        None,
    )
    .await
    .unwrap();
    let hash = hash_hex(&data);
    assert_eq!(open_files_named(&hash), 0, "the write left its file open");

    let mut client = ByteStreamClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    let mut stream = client
        .read(ReadRequest {
            resource_name: read_name("", &data),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first chunk");
    let mut got = first.data.len();
    assert!(open_files_named(&hash) >= 1, "the read holds no file open");

    // The client stops taking data. The server must let go of the file by itself.
    assert!(
        eventually(|| open_files_named(&hash) == 0).await,
        "the stalled read still holds the blob's file open"
    );
    assert_eq!(s.context.metrics.stalled_streams.get(), 1);

    // Coming back, the client gets what was already in flight, then ABORTED: never a
    // short stream that ends OK.
    let err = loop {
        match stream.message().await {
            Ok(Some(m)) => got += m.data.len(),
            Ok(None) => panic!("the stream ended OK after {got} of {} bytes", data.len()),
            Err(e) => break e,
        }
    };
    assert!(got < data.len(), "the whole blob arrived ({got} bytes)");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(
        err.message().contains("stream_stall_timeout_seconds"),
        "{}",
        err.message()
    );
    // A reader that keeps reading is not affected.
    assert_eq!(
        bs_read(ch, &read_name("", &data), 0, 0, None)
            .await
            .unwrap(),
        data
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_write_whose_client_stops_sending_is_aborted_and_stays_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fs_config(dir.path(), 1 << 30);
    config.connections.stream_stall_timeout_seconds = 1;
    let s = start(config).await;
    let ch = channel(&s).await;
    let data = blob(100_000, 42);
    let name = upload_name("", "7e0d6a1c-0000-4000-8000-000000000042", &data);

    // The client sends 10 bytes and then nothing, holding the stream open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WriteRequest {
        resource_name: name.clone(),
        write_offset: 0,
        finish_write: false,
        data: data[..10].to_vec(),
    })
    .await
    .unwrap();
    let mut client = ByteStreamClient::new(ch.clone());
    let call = tokio::spawn(async move { client.write(ReceiverStream::new(rx)).await });
    let err = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the stalled write is never ended")
        .unwrap()
        .unwrap_err();
    drop(tx);
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("sent nothing"), "{}", err.message());
    assert_eq!(s.context.metrics.stalled_streams.get(), 1);

    // Resumable: what arrived is kept and the client goes on from there.
    let status = ByteStreamClient::new(ch.clone())
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.committed_size, 10);
    assert_eq!(s.context.metrics.upload_sessions.get(), 1);
    bs_write(
        ch.clone(),
        write_requests(&name, &data, 4096, 10, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        bs_read(ch, &read_name("", &data), 0, 0, None)
            .await
            .unwrap(),
        data
    );
    assert_eq!(s.context.metrics.upload_sessions.get(), 0);
    s.shutdown().await;
}

/// Defect 12 of the hardening audit: a write that failed at its start (an 8 MB resource
/// name) left its session behind. Every early failure must leave none, and no temp bytes.
#[tokio::test]
async fn writes_that_fail_at_their_start_leave_no_session_and_no_temp_space() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(fs_config(dir.path(), 1 << 20)).await;
    let ch = channel(&s).await;
    let data = blob(1000, 43);
    let h = hash_hex(&data);
    let uuid = "7e0d6a1c-0000-4000-8000-000000000043";
    let first = |name: String, offset: i64| WriteRequest {
        resource_name: name,
        write_offset: offset,
        finish_write: true,
        data: data.clone(),
    };
    let cases: Vec<(&str, Vec<WriteRequest>, Code)> = vec![
        (
            "an 8 MB resource name",
            vec![first(
                format!("uploads/{uuid}/blobs/{h}/1000/{}", "x".repeat(8 << 20)),
                0,
            )],
            Code::InvalidArgument,
        ),
        (
            "a first offset the server has no record of",
            vec![first(upload_name("", uuid, &data), 500)],
            Code::InvalidArgument,
        ),
        (
            "a blob larger than the whole store",
            vec![first(format!("uploads/{uuid}/blobs/{h}/{}", 2 << 20), 0)],
            Code::InvalidArgument,
        ),
        (
            "data that does not match the digest",
            vec![first(upload_name("", uuid, &blob(1000, 44)), 0)],
            Code::InvalidArgument,
        ),
        (
            "a resource name that changes within the stream",
            {
                let mut reqs = write_requests(&upload_name("", uuid, &data), &data, 100, 0, true);
                reqs[1].resource_name = format!("uploads/{uuid}/blobs/{}/1000", "0".repeat(64));
                reqs
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, reqs, code) in cases {
        let err = bs_write(ch.clone(), reqs, None).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert_eq!(
            s.context.metrics.upload_sessions.get(),
            0,
            "{what} left its session"
        );
        assert_eq!(
            s.context.metrics.store.in_flight_bytes.get(),
            0,
            "{what} left temp bytes"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "files left in tmp/"
    );
    // And the same upload id still works afterwards.
    bs_write(
        ch.clone(),
        write_requests(&upload_name("", uuid, &data), &data, 100, 0, true),
        None,
    )
    .await
    .unwrap();
    assert_eq!(s.context.metrics.upload_sessions.get(), 0);
    s.shutdown().await;
}
