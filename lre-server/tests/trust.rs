//! Who may write the action cache and who wrote each entry, against a real server:
//! executed-only instances, provenance (listing and purging what one token wrote), and the
//! HTTP port's defences (host names, cross-site writes, protective headers, instance names
//! unknown to an unauthenticated caller).

mod common;

use common::*;
use lre_server::auth::Scope;
use lre_server::instance::InstanceSettings;
use prost::Message;
use reqwest::StatusCode;
use tonic::Code;

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// Uploads the outputs of `action_result(out, stdout)` and writes it for `action`.
async fn write(
    s: &lre_server::RunningServer,
    instance: &str,
    action: &[u8],
    out: &[u8],
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let ch = channel(s).await;
    batch_put(ch.clone(), instance, &[out, b"stdout"], token).await?;
    update_ac(
        ch,
        instance,
        &digest(action),
        action_result(out, b"stdout"),
        token,
    )
    .await
}

fn tokens_config() -> lre_server::config::Config {
    let mut c = memory_config();
    c.auth.anonymous = Scope::None;
    c.auth.tokens = vec![
        token("ci", "ci-secret", Scope::ReadWrite, None),
        token("dev", "dev-secret", Scope::ReadWrite, None),
        token("reader", "read-secret", Scope::Read, None),
        token("ops", "ops-secret", Scope::Admin, None),
    ];
    c
}

/// Issue 21, part 1: an executed-only instance takes results from lre's scheduler only.
#[tokio::test]
async fn an_executed_only_instance_refuses_every_clients_result() {
    let mut c = tokens_config();
    c.execution.enabled = true;
    c.instance_settings.insert(
        "main".into(),
        InstanceSettings {
            executed_only: true,
            ..Default::default()
        },
    );
    let s = start(c).await;
    let ch = channel(&s).await;
    let e = write(&s, "main", b"action", b"poison", Some("ci-secret"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("instance_settings.main.executed_only = true"),
        "{}",
        e.message()
    );
    assert_eq!(
        get_ac(ch.clone(), "main", &digest(b"action"), Some("ci-secret"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "nothing was stored"
    );
    // Over HTTP too, and Capabilities says so.
    let url = format!("{}/main/ac/{}", http_url(&s), hash_hex(b"action"));
    let r = http()
        .put(&url)
        .bearer_auth("ci-secret")
        .body(action_result(b"poison", b"stdout").encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("executed_only"));
    let caps = |instance: &'static str| {
        let ch = ch.clone();
        async move {
            CapabilitiesClient::new(ch)
                .get_capabilities(authed(
                    bazel_remote_apis::build::bazel::remote::execution::v2::GetCapabilitiesRequest {
                        instance_name: instance.into(),
                    },
                    Some("ci-secret"),
                ))
                .await
                .unwrap()
                .into_inner()
                .cache_capabilities
                .unwrap()
                .action_cache_update_capabilities
                .unwrap()
                .update_enabled
        }
    };
    assert!(!caps("main").await, "update_enabled = false");
    // Another instance of the same server is unaffected.
    assert!(caps("other").await);
    write(&s, "other", b"action", b"fine", Some("ci-secret"))
        .await
        .unwrap();
    s.shutdown().await;
}

#[derive(serde::Deserialize, Debug)]
struct Listing {
    count: usize,
    purged: Option<usize>,
    entries: Vec<serde_json::Value>,
}

async fn provenance(
    s: &lre_server::RunningServer,
    path: &str,
    writer: &str,
    token: &str,
) -> (StatusCode, String) {
    let url = format!("{}{path}?writer={writer}", http_url(s));
    let req = if path.ends_with("purge") {
        http().post(url)
    } else {
        http().get(url)
    };
    let r = req.bearer_auth(token).send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

/// Issue 21, part 2: every entry records who wrote it; an operator lists and purges one
/// token's entries, and the other token's stay.
#[tokio::test]
async fn one_tokens_results_are_listed_and_purged_and_the_others_stay() {
    let s = start(tokens_config()).await;
    let ch = channel(&s).await;
    for i in 0..3u8 {
        write(&s, "", &[b'c', i], &[b'o', i], Some("ci-secret"))
            .await
            .unwrap();
    }
    for i in 0..2u8 {
        write(&s, "team", &[b'd', i], &[b'p', i], Some("dev-secret"))
            .await
            .unwrap();
    }
    // Who wrote an entry is kept with it, and shown to its readers.
    let url = format!(
        "{}/api/provenance/action?instance=team&action={}",
        http_url(&s),
        hash_hex(&[b'd', 0])
    );
    let body = http()
        .get(&url)
        .bearer_auth("read-secret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let one: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(one["token"], "dev", "{one}");
    assert_eq!(one["source"], "uploaded");
    assert_eq!(one["instance"], "team");
    // Listing and purging are an admin's.
    let (code, body) = provenance(&s, "/api/provenance", "token:ci", "ci-secret").await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("admin"), "{body}");
    let (code, body) = provenance(&s, "/api/provenance", "token:ci", "ops-secret").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let l: Listing = serde_json::from_str(&body).unwrap();
    assert_eq!(l.count, 3, "{body}");
    assert!(l.entries.iter().all(|e| e["token"] == "ci"), "{body}");
    let (code, body) = provenance(&s, "/api/provenance/purge", "token:ci", "ops-secret").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let l: Listing = serde_json::from_str(&body).unwrap();
    assert_eq!(l.purged, Some(3), "{body}");
    for i in 0..3u8 {
        let e = get_ac(ch.clone(), "", &digest(&[b'c', i]), Some("read-secret"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "ci's result {i} is gone");
    }
    for i in 0..2u8 {
        get_ac(ch.clone(), "team", &digest(&[b'd', i]), Some("read-secret"))
            .await
            .expect("dev's results stay");
    }
    let (_, body) = provenance(&s, "/api/provenance", "token:dev", "ops-secret").await;
    assert_eq!(serde_json::from_str::<Listing>(&body).unwrap().count, 2);
    let (code, _) = provenance(&s, "/api/provenance", "nobody", "ops-secret").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    s.shutdown().await;
}

async fn get_with_host(s: &lre_server::RunningServer, path: &str, host: &str) -> reqwest::Response {
    http()
        .get(format!("{}{path}", http_url(s)))
        .header(reqwest::header::HOST, host)
        .send()
        .await
        .unwrap()
}

/// Issue 21, defects 2 and 10: a web page that rebinds its name to 127.0.0.1 reached
/// `lre up`'s cache under that name (and wrote to it); the pages sent no protective
/// headers.
#[tokio::test]
async fn the_http_port_refuses_foreign_host_names_and_cross_site_writes() {
    let mut c = memory_config();
    c.http_allowed_hosts = vec!["cache.example.com".into()];
    let s = start(c).await;
    let port = s.http_addr.unwrap().port();
    let blob = b"rebinding".to_vec();
    let cas = format!("/cas/{}", hash_hex(&blob));
    for host in [format!("evil.example:{port}"), "attacker.test".into()] {
        for path in ["/", "/api/status", cas.as_str()] {
            let r = get_with_host(&s, path, &host).await;
            assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST, "{host}{path}");
        }
        let r = http()
            .put(format!("{}{cas}", http_url(&s)))
            .header(reqwest::header::HOST, &host)
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "[::1]".into(),
        format!("cache.example.com:{port}"),
        "CACHE.example.com.".into(),
    ] {
        let r = get_with_host(&s, "/api/status", &host).await;
        assert_eq!(r.status(), StatusCode::OK, "{host}");
    }
    // A write a browser sends for another site.
    let url = format!("{}{cas}", http_url(&s));
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = http()
            .put(&url)
            .header(name, value)
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{name}: {value}");
    }
    let r = get_with_host(&s, &cas, "127.0.0.1").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "nothing was stored");
    let r = http()
        .put(&url)
        .header("origin", format!("http://127.0.0.1:{port}"))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "a same-origin write is a write");
    // Protective headers on the page and everything else.
    let r = get_with_host(&s, "/", "localhost").await;
    let h = r.headers();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    s.shutdown().await;
}

/// Issue 21, defect 9: without a token, `/b/ac/…` answered 401 but `/unknown/ac/…` 404
/// "unknown instance", so instance names could be enumerated.
#[tokio::test]
async fn an_unauthenticated_caller_cannot_tell_instances_apart() {
    let mut c = tokens_config();
    c.instances = Some(vec!["".into(), "b".into()]);
    let s = start(c).await;
    let h = hash_hex(b"x");
    for prefix in ["/b", "/unknown", ""] {
        let r = http()
            .get(format!("{}{prefix}/ac/{h}", http_url(&s)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{prefix}");
    }
    let ch = channel(&s).await;
    for instance in ["b", "unknown"] {
        let e = get_ac(ch.clone(), instance, &digest(b"x"), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{instance}: {e:?}");
    }
    // A caller who may use any instance is told that one does not exist.
    let e = get_ac(ch.clone(), "unknown", &digest(b"x"), Some("read-secret"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("unknown instance"), "{}", e.message());
    s.shutdown().await;
}
