//! The status page and its API, against a real server and worker: who may see what
//! (tokens, instances, `/metrics`), failed actions' stderr, and miss explanations from the
//! server's own history of two invocations.

mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use common::{execute, execute_with, upload, wait_workers, with_metadata, Exec};
use lre_server::auth::{Scope, TokenConfig};
use lre_worker::cas::digest_of;
use lre_worker::Credential;
use prost::Message;
use re::action_cache_client::ActionCacheClient;
use serde_json::Value;
use tonic::transport::Channel;

const CI: &str = "ci-secret-read-write-000000000001";
const TEAM: &str = "team-reader-secret-00000000000002";
const SEC: &str = "secret-reader-secret-000000000003";
const WORKER: &str = "worker-secret-0000000000000000004";

fn token(name: &str, secret: &str, scope: Scope, instances: Option<&[&str]>) -> TokenConfig {
    TokenConfig {
        instances: instances.map(|l| l.iter().map(|i| i.to_string()).collect()),
        ..TokenConfig::for_secret(name, secret, scope)
    }
}

async fn setup() -> (
    lre_server::RunningServer,
    Channel,
    tokio::sync::watch::Sender<bool>,
    tempfile::TempDir,
) {
    let mut c = lre_server::Config::ephemeral();
    c.http_listen = Some("127.0.0.1:0".parse().unwrap());
    c.execution.enabled = true;
    c.execution.keepalive_seconds = 1;
    c.shutdown_grace_seconds = 1;
    c.instances = Some(vec!["team".into(), "secret".into()]);
    c.auth.anonymous = Scope::None;
    c.status.protect_metrics = true;
    c.auth.tokens = vec![
        token("ci", CI, Scope::ReadWrite, None),
        token("team", TEAM, Scope::Read, Some(&["team"])),
        token("sec", SEC, Scope::Read, Some(&["secret"])),
        token("workers", WORKER, Scope::Worker, None),
    ];
    let server = lre_server::start(c).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut o = lre_worker::WorkerOptions::local(
        format!("http://{}", server.grpc_addr),
        "w1".into(),
        dir.path().into(),
        vec![],
        lre_worker::default_ro_paths(),
    );
    o.credential = Credential::bearer(WORKER).unwrap();
    tokio::spawn(lre_worker::run(o, shutdown));
    assert!(wait_workers(&server, 1).await, "the worker attached");
    let ch = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (server, ch, stop, dir)
}

async fn get(url: &str, secret: Option<&str>) -> (u16, String, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(s) = secret {
        req = req.bearer_auth(s);
    }
    let r = req.send().await.unwrap();
    let (code, headers) = (r.status().as_u16(), r.headers().clone());
    (code, r.text().await.unwrap(), headers)
}

async fn json(url: &str, secret: &str) -> Value {
    let (code, body, _) = get(url, Some(secret)).await;
    assert_eq!(code, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Uploads an Action whose command runs `cc` on `x.c` (content `src`) into out/x.o, and
/// looks its key up as invocation `inv` (a miss: nothing ever ran it).
async fn look_up(ch: &Channel, inv: &str, cc: &str, src: &[u8]) {
    let cmd = re::Command {
        arguments: vec![format!("{cc}/bin/cc"), "-c".into(), "x.c".into()],
        output_paths: vec!["out/x.o".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = re::Directory {
        files: vec![re::FileNode {
            name: "x.c".into(),
            digest: Some(digest_of(src)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let act = re::Action {
        command_digest: Some(digest_of(&cmd)),
        input_root_digest: Some(digest_of(&root)),
        ..Default::default()
    }
    .encode_to_vec();
    upload(ch, "team", Some(CI), [cmd, root, act.clone(), src.to_vec()])
        .await
        .unwrap();
    let r = ActionCacheClient::new(ch.clone())
        .get_action_result(with_metadata(
            re::GetActionResultRequest {
                instance_name: "team".into(),
                action_digest: Some(digest_of(&act)),
                ..Default::default()
            },
            Some(CI),
            Some(inv),
        ))
        .await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound);
}

fn failed_action(status: &Value, instance: &str) -> Value {
    status["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["outcome"] == "failed" && r["instance"] == instance)
        .cloned()
        .unwrap_or_else(|| panic!("no failed action of {instance} in {status:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_sees_its_instances_and_failed_actions_stderr() {
    let (server, ch, stop, _dir) = setup().await;
    let base = format!("http://{}", server.http_addr.unwrap());
    for (instance, inv, text, code) in [
        ("secret", "inv-s", "secret-stderr", 4),
        ("team", "inv-t", "team-stderr", 5),
    ] {
        let script = format!("echo {text} >&2; exit {code}");
        let r = execute(
            &ch,
            Exec {
                instance,
                argv: &["sh", "-c", &script],
                input: b"",
                secret: Some(CI),
                invocation: Some(inv),
            },
        )
        .await
        .unwrap();
        assert_eq!(r.result.unwrap().exit_code, code);
    }

    // Nothing without a token (the server has anonymous = "none"), and the browser is told
    // how to authenticate.
    let (code, _, headers) = get(&format!("{base}/"), None).await;
    assert_eq!(code, 401);
    assert!(headers[reqwest::header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    assert_eq!(get(&format!("{base}/api/status"), None).await.0, 401);
    assert_eq!(
        get(&format!("{base}/metrics"), None).await.0,
        401,
        "protect_metrics"
    );
    assert_eq!(get(&format!("{base}/metrics"), Some(TEAM)).await.0, 200);
    assert_eq!(
        get(&format!("{base}/api/status"), Some(WORKER)).await.0,
        200,
        "a worker token may read"
    );

    let team = json(&format!("{base}/api/status"), TEAM).await;
    let recent = team["recent"].as_array().unwrap();
    assert!(
        recent.iter().all(|r| r["instance"] == "team"),
        "{recent:#?}"
    );
    let invs: Vec<&str> = team["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(invs, ["inv-t"]);
    let workers = team["execution"]["workers"].as_array().unwrap();
    assert_eq!(workers[0]["id"], "workers/w1");
    let t = failed_action(&team, "team");
    assert_eq!(
        (
            t["exit_code"].as_i64(),
            t["worker"].as_str(),
            t["has_stderr"].as_bool()
        ),
        (Some(5), Some("workers/w1"), Some(true))
    );
    assert_eq!(t["mnemonic"], "Genrule");

    let sec = json(&format!("{base}/api/status"), SEC).await;
    let s = failed_action(&sec, "secret");
    let stderr = |id: &Value| format!("{base}/api/actions/{id}/stderr");
    let (code, body, _) = get(&stderr(&t["id"]), Some(TEAM)).await;
    assert_eq!((code, body.as_str()), (200, "team-stderr\n"));
    let (code, body, _) = get(&stderr(&s["id"]), Some(SEC)).await;
    assert_eq!((code, body.as_str()), (200, "secret-stderr\n"));
    // Another instance's stderr is not there for this token, whatever the id.
    assert_eq!(get(&stderr(&s["id"]), Some(TEAM)).await.0, 404);
    assert_eq!(get(&stderr(&t["id"]), Some(SEC)).await.0, 404);
    assert_eq!(
        get(&format!("{base}/api/actions/999999/stderr"), Some(CI))
            .await
            .0,
        404
    );
    assert_eq!(
        get(&format!("{base}/api/actions/x/stderr"), Some(CI))
            .await
            .0,
        404
    );

    // The page, with HTTP basic auth as a browser sends it.
    let page = reqwest::Client::new()
        .get(format!("{base}/"))
        .basic_auth("team", Some(TEAM))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains(r#"<td class="worker-id">workers/w1</td>"#),
        "{html}"
    );
    assert!(html.contains(r#"<tr class="action failed">"#));
    assert!(html.contains(&format!(r#"href="/api/actions/{}/stderr""#, t["id"])));
    assert!(
        !html.contains("inv-s"),
        "another instance's invocation leaked into the page"
    );

    let _ = stop.send(true);
    server.shutdown().await;
}

/// Issue 21, part 2: a result the scheduler stored records the worker that ran it and the
/// worker's token; a hit on it says so on the status API, and one entry's writer is
/// there for any reader of its instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_names_the_worker_and_token_that_wrote_it() {
    let (server, ch, stop, _dir) = setup().await;
    let base = format!("http://{}", server.http_addr.unwrap());
    let (r, action) = execute_with(
        &ch,
        Exec {
            instance: "team",
            argv: &["sh", "-c", "echo provenance"],
            input: b"",
            secret: Some(CI),
            invocation: Some("inv-run"),
        },
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.result.unwrap().exit_code, 0);
    let hit = ActionCacheClient::new(ch.clone())
        .get_action_result(with_metadata(
            re::GetActionResultRequest {
                instance_name: "team".into(),
                action_digest: Some(action.clone()),
                ..Default::default()
            },
            Some(TEAM),
            Some("inv-read"),
        ))
        .await;
    assert!(hit.is_ok(), "{hit:?}");
    let team = json(&format!("{base}/api/status"), TEAM).await;
    let h = team["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["outcome"] == "hit")
        .cloned()
        .unwrap_or_else(|| panic!("no hit in {team:#}"));
    assert_eq!(h["written_by"]["source"], "executed", "{h:#}");
    assert_eq!(h["written_by"]["worker"], "workers/w1");
    assert_eq!(h["written_by"]["token"], "workers");
    let one = json(
        &format!(
            "{base}/api/provenance/action?instance=team&action={}",
            action.hash
        ),
        TEAM,
    )
    .await;
    assert_eq!(one["worker"], "workers/w1", "{one:#}");
    assert_eq!(one["instance"], "team");
    assert!(!one["operation"].as_str().unwrap().is_empty());
    // The page shows it too.
    let html = reqwest::Client::new()
        .get(format!("{base}/"))
        .bearer_auth(TEAM)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains(r#"<td class="written-by">worker workers/w1 (token workers)"#),
        "{html}"
    );
    let _ = stop.send(true);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_invocations_misses_are_explained_down_to_the_store_path() {
    let (server, ch, stop, _dir) = setup().await;
    let base = format!("http://{}", server.http_addr.unwrap());
    look_up(&ch, "inv-a", "/nix/store/aaa-cc", b"int x;").await;
    look_up(&ch, "inv-b", "/nix/store/bbb-cc", b"int x = 1;").await;

    let e = json(&format!("{base}/api/explain"), TEAM).await;
    assert_eq!(
        (e["base"]["id"].as_str(), e["new"]["id"].as_str()),
        (Some("inv-a"), Some("inv-b")),
        "{e:#}"
    );
    let d = &e["differing"][0];
    assert_eq!(d["output"], "out/x.o");
    let diffs: Vec<&str> = d["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(
        diffs.contains(&"argument 0: \"/nix/store/aaa-cc/bin/cc\" → \"/nix/store/bbb-cc/bin/cc\""),
        "{diffs:?}"
    );
    assert!(
        diffs.iter().any(|x| x.starts_with("input x.c: ")),
        "{diffs:?}"
    );
    assert_eq!(
        e["store_paths_new"],
        serde_json::json!(["/nix/store/bbb-cc"])
    );
    assert_eq!(
        e["store_paths_base"],
        serde_json::json!(["/nix/store/aaa-cc"])
    );

    // The same on the page; named invocations; and nothing for a token of another instance.
    let (code, html, _) = get(
        &format!("{base}/explain?instance=team&base=inv-a&new=inv-b"),
        Some(TEAM),
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        html.contains(r#"<li class="store-path new">+ <code>/nix/store/bbb-cc</code>"#),
        "{html}"
    );
    let (code, body, _) = get(&format!("{base}/api/explain?instance=team"), Some(SEC)).await;
    assert_eq!(code, 404, "{body}");
    let (code, body, _) = get(&format!("{base}/api/explain?new=inv-a"), Some(TEAM)).await;
    assert!(code == 404 && body.contains("oldest"), "{code} {body}");

    let _ = stop.send(true);
    server.shutdown().await;
}

#[tokio::test]
async fn without_protect_metrics_prometheus_needs_no_token() {
    let mut c = lre_server::Config::ephemeral();
    c.http_listen = Some("127.0.0.1:0".parse().unwrap());
    c.auth.anonymous = Scope::None;
    let server = lre_server::start(c).await.unwrap();
    let base = format!("http://{}", server.http_addr.unwrap());
    assert_eq!(get(&format!("{base}/metrics"), None).await.0, 200);
    assert_eq!(get(&format!("{base}/"), None).await.0, 401);
    server.shutdown().await;
}
