//! Action results in Redis, shared by two server replicas: what one replica stores the
//! other serves at once; Redis going away is UNAVAILABLE on both, never a miss or a partial
//! result; both recover when it is back. A real redis-server, started by the test.

mod common;
use lre_test_support::redis as redis_server;

use std::time::Duration;

use common::*;
use lre_server::config::{Config, StoreConfig};
use lre_store::config::RedisConfig;
use redis_server::{dead_port, Redis};
use tonic::Code;

fn replica(url: &str) -> Config {
    let mut c = memory_config();
    let mut r = RedisConfig::new(url);
    r.request_timeout_seconds = 2;
    c.action_cache_store = Some(StoreConfig::Redis(r));
    c
}

/// A result that references no blob, so each replica's own CAS has all it needs.
fn result(exit_code: i32) -> bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult {
    bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult {
        exit_code,
        ..Default::default()
    }
}

#[tokio::test]
async fn replicas_share_action_results_through_redis_and_survive_it_going_away() {
    let redis = Redis::up(&[]);
    let a = start(replica(&redis.url)).await;
    let b = start(replica(&redis.url)).await;
    let (ca, cb) = (channel(&a).await, channel(&b).await);
    let action = digest(b"action one");

    update_ac(ca.clone(), "", &action, result(3), None)
        .await
        .unwrap();
    let got = get_ac(cb.clone(), "", &action, None).await.unwrap();
    assert_eq!(got.exit_code, 3, "replica B serves what replica A stored");
    // Who wrote it travels with it (an anonymous client's upload, here), through Redis.
    let hash: [u8; 32] = hex::decode(&action.hash).unwrap().try_into().unwrap();
    let hit = b
        .context
        .get_action_result("", lre_server::digest::DigestFunction::Sha256, hash)
        .await
        .unwrap()
        .unwrap();
    let p = hit
        .provenance
        .expect("provenance kept through the Redis store");
    assert_eq!((p.source.as_str(), p.token.as_str()), ("uploaded", ""));
    assert_eq!(p.action, action.hash);
    // An exit-0 result without outputs encodes to zero bytes: still a hit, not a miss.
    let empty = digest(b"action empty");
    update_ac(cb.clone(), "", &empty, result(0), None)
        .await
        .unwrap();
    assert_eq!(
        get_ac(ca.clone(), "", &empty, None)
            .await
            .unwrap()
            .exit_code,
        0
    );
    // Instances stay apart in the shared Redis too.
    let e = get_ac(cb.clone(), "other", &action, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    redis.kill();
    for ch in [&ca, &cb] {
        let e = get_ac(ch.clone(), "", &action, None).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        // Issue 21, defect 6: the message named the Redis ("redis at redis://10.…"). The
        // client is told what failed; the address is for the server's log.
        assert!(
            e.message().contains("storage backend did not answer")
                && !e.message().contains("redis")
                && !e.message().contains("127.0.0.1"),
            "{}",
            e.message()
        );
        let e = update_ac(ch.clone(), "", &action, result(4), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }
    // The CAS (the memory store) is not Redis: it keeps working meanwhile.
    let blob: &[u8] = b"cas is not redis";
    let codes = batch_put(ca.clone(), "", &[blob], None).await.unwrap();
    assert_eq!(codes, vec![0]);
    assert!(find_missing(ca.clone(), "", vec![digest(blob)])
        .await
        .is_empty());

    redis.start();
    let mut back = false;
    for _ in 0..50 {
        match update_ac(ca.clone(), "", &action, result(5), None).await {
            Ok(()) => {
                back = true;
                break;
            }
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(back, "replica A reconnects to the restarted Redis");
    let mut served = None;
    for _ in 0..50 {
        match get_ac(cb.clone(), "", &action, None).await {
            Ok(r) => {
                served = Some(r.exit_code);
                break;
            }
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(
        served,
        Some(5),
        "replica B reconnects and sees A's new result"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_redis_at_start_is_an_error_naming_the_key_and_the_server() {
    let url = format!("redis://127.0.0.1:{}/0", dead_port());
    let e = lre_server::start(replica(&url))
        .await
        .err()
        .expect("must not start");
    let m = e.to_string();
    assert!(m.starts_with("action_cache_store: "), "{m}");
    assert!(m.contains(&url), "{m}");
}

#[tokio::test]
async fn a_redis_url_with_a_password_is_refused_by_the_config() {
    let c = replica("redis://:pw@127.0.0.1:6379");
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("action_cache_store.url"), "{e}");
    let text = "[action_cache_store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1\"\nbogus = 1\n";
    let e = Config::from_toml(text).unwrap_err();
    assert!(e.contains("bogus"), "{e}");
}
