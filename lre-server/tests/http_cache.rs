//! The HTTP/1.1 cache protocol through a real HTTP client, and its sharing with gRPC.

mod common;

use common::*;
use prost::Message;
use reqwest::StatusCode;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn put(url: &str, body: Vec<u8>) -> StatusCode {
    client().put(url).body(body).send().await.unwrap().status()
}

async fn get(url: &str) -> (StatusCode, Vec<u8>) {
    let r = client().get(url).send().await.unwrap();
    (r.status(), r.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn cas_and_ac_put_get_head_with_and_without_prefix() {
    let s = start(memory_config()).await;
    let base = http_url(&s);
    for prefix in ["", "/team/x"] {
        let data = format!("blob under {prefix:?}").into_bytes();
        let cas = format!("{base}{prefix}/cas/{}", hash_hex(&data));
        assert_eq!(put(&cas, data.clone()).await, StatusCode::OK);
        assert_eq!(get(&cas).await, (StatusCode::OK, data.clone()));
        let head = client().head(&cas).send().await.unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        // The header itself: reqwest's content_length() reports a HEAD body's size (0).
        let len = head.headers()[reqwest::header::CONTENT_LENGTH]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(len, data.len().to_string());

        let stdout = b"stdout".to_vec();
        put(
            &format!("{base}{prefix}/cas/{}", hash_hex(&stdout)),
            stdout.clone(),
        )
        .await;
        let result = action_result(&data, &stdout).encode_to_vec();
        let ac = format!("{base}{prefix}/ac/{}", hash_hex(b"an action"));
        assert_eq!(put(&ac, result.clone()).await, StatusCode::OK);
        assert_eq!(get(&ac).await, (StatusCode::OK, result));
        assert_eq!(
            client().head(&ac).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
    // The two prefixes are separate action caches; the CAS is shared.
    let (status, _) = get(&format!("{base}/other/ac/{}", hash_hex(b"an action"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    s.shutdown().await;
}

#[tokio::test]
async fn mismatched_or_malformed_uploads_store_nothing() {
    let s = start(memory_config()).await;
    let base = http_url(&s);
    let claimed = b"what the url says".to_vec();
    let url = format!("{base}/cas/{}", hash_hex(&claimed));
    let r = client()
        .put(&url)
        .body(b"something else".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("digest mismatch"));
    assert_eq!(get(&url).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        find_missing(channel(&s).await, "", vec![digest(b"something else")])
            .await
            .len(),
        1
    );

    let h = hash_hex(b"x");
    for bad in [&h[..63], &h.to_uppercase(), &"g".repeat(64)] {
        assert_eq!(
            get(&format!("{base}/cas/{bad}")).await.0,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    assert_eq!(
        get(&format!("{base}/nothing/here")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        client()
            .delete(format!("{base}/cas/{h}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::METHOD_NOT_ALLOWED
    );

    // An action-cache body that is not an ActionResult is refused and not stored.
    let ac = format!("{base}/ac/{}", hash_hex(b"action"));
    assert_eq!(
        put(&ac, vec![0x0a, 0xff, 0xff, 0xff]).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(get(&ac).await.0, StatusCode::NOT_FOUND);
    s.shutdown().await;
}

#[tokio::test]
async fn http_and_grpc_share_one_store() {
    let s = start(memory_config()).await;
    let (base, ch) = (http_url(&s), channel(&s).await);
    // HTTP in, gRPC out.
    let a = blob(300_000, 1);
    assert_eq!(
        put(&format!("{base}/cas/{}", hash_hex(&a)), a.clone()).await,
        StatusCode::OK
    );
    assert_eq!(
        bs_read(ch.clone(), &read_name("any-instance", &a), 0, 0, None)
            .await
            .unwrap(),
        a
    );
    // gRPC in, HTTP out.
    let b = blob(1000, 2);
    batch_put(ch.clone(), "", &[&b], None).await.unwrap();
    assert_eq!(
        get(&format!("{base}/cas/{}", hash_hex(&b))).await,
        (StatusCode::OK, b.clone())
    );
    // Action results: gRPC instance "inst" is HTTP prefix "/inst".
    let action = digest(b"shared action");
    update_ac(ch.clone(), "inst", &action, action_result(&a, &b), None)
        .await
        .unwrap();
    let (status, body) = get(&format!("{base}/inst/ac/{}", action.hash)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult::decode(&body[..])
            .unwrap(),
        action_result(&a, &b)
    );
    let other = digest(b"http action");
    put(
        &format!("{base}/inst/ac/{}", other.hash),
        action_result(&b, &a).encode_to_vec(),
    )
    .await;
    assert_eq!(
        get_ac(ch.clone(), "inst", &other, None).await.unwrap(),
        action_result(&b, &a)
    );
    s.shutdown().await;
}

#[tokio::test]
async fn incomplete_action_results_are_not_served() {
    let s = start(memory_config()).await;
    let base = http_url(&s);
    let (out, stdout) = (b"out".to_vec(), b"stdout".to_vec());
    put(&format!("{base}/cas/{}", hash_hex(&stdout)), stdout.clone()).await;
    let ac = format!("{base}/ac/{}", hash_hex(b"act"));
    let result = action_result(&out, &stdout).encode_to_vec();
    assert_eq!(put(&ac, result.clone()).await, StatusCode::OK);
    assert_eq!(get(&ac).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        client().head(&ac).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    put(&format!("{base}/cas/{}", hash_hex(&out)), out.clone()).await;
    assert_eq!(get(&ac).await, (StatusCode::OK, result));
    s.shutdown().await;
}

#[tokio::test]
async fn empty_blob_exists_without_upload() {
    let s = start(memory_config()).await;
    let (status, body) = get(&format!("{}/cas/{}", http_url(&s), hash_hex(b""))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn unknown_instances_are_named() {
    let mut cfg = memory_config();
    cfg.instances = Some(vec!["".into(), "main".into()]);
    let s = start(cfg).await;
    let base = http_url(&s);
    let r = client()
        .get(format!("{base}/other/cas/{}", hash_hex(b"x")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("unknown instance name \"other\""));
    let data = b"main data".to_vec();
    assert_eq!(
        put(&format!("{base}/main/cas/{}", hash_hex(&data)), data).await,
        StatusCode::OK
    );
    s.shutdown().await;
}

#[tokio::test]
async fn health_and_metrics() {
    let s = start(memory_config()).await;
    let base = http_url(&s);
    assert_eq!(
        get(&format!("{base}/healthz")).await,
        (StatusCode::OK, b"ok\n".to_vec())
    );
    let data = blob(12_345, 3);
    put(&format!("{base}/cas/{}", hash_hex(&data)), data.clone()).await;
    get(&format!("{base}/cas/{}", hash_hex(&data))).await;
    get(&format!("{base}/ac/{}", hash_hex(b"nope"))).await;
    let (status, body) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    for needle in [
        "lre_store_size_bytes 12345",
        "lre_store_entries 1",
        "lre_ac_lookups_total{result=\"miss\"} 1",
        "lre_cas_lookups_total{result=\"hit\"} 1",
        "lre_received_bytes_total 12345",
        "lre_sent_bytes_total 12345",
        "lre_request_duration_seconds_count{method=\"http_put\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    s.shutdown().await;
}
