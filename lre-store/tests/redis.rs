//! The Redis store against a real redis-server on loopback (started by `e2e/redis/redis.sh`).

use std::time::Duration;

use lre_store::config::RedisConfig;
use lre_store::error::StoreError;
use lre_store::store::{BlobStore, Key, KeyKind, RedisStore};
use lre_test_support::redis::{dead_port, Redis};

fn config(url: &str) -> RedisConfig {
    let mut c = RedisConfig::new(url);
    c.request_timeout_seconds = 2;
    c
}

async fn set(store: &dyn BlobStore, key: Key, data: &[u8]) -> Result<(), StoreError> {
    let mut w = store.writer(Some(data.len() as u64)).await?;
    w.write(data).await?;
    w.commit(key).await
}

fn ac(n: u8) -> Key {
    Key::ac("main", lre_store::digest::DigestFunction::Sha256, &[n; 32])
}

/// `key`'s entry once the store answers again (Redis back, a new connection dialled):
/// `get` retried up to 50 times, 100 ms apart.
async fn get_when_back(store: &RedisStore, key: Key) -> Option<bytes::Bytes> {
    for _ in 0..50 {
        if let Ok(Some(v)) = store.get(&key).await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test]
async fn entries_round_trip_and_an_empty_entry_is_present() {
    let redis = Redis::up(&[]);
    let store = RedisStore::open(&config(&redis.url)).await.unwrap();
    set(&store, ac(1), b"").await.unwrap();
    set(&store, ac(2), b"an action result").await.unwrap();
    assert_eq!(
        store.lookup(&[ac(1), ac(2), ac(3)]).await.unwrap(),
        vec![Some(0), Some(16), None],
        "an empty result (exit code 0, no outputs) encodes to no bytes and must still hit"
    );
    assert_eq!(store.get(&ac(1)).await.unwrap().as_deref(), Some(&b""[..]));
    assert_eq!(
        lre_test_support::read_all(&store, &ac(2), 10)
            .await
            .as_deref(),
        Some(&b"result"[..])
    );
    assert!(store.get(&ac(3)).await.unwrap().is_none());
    store.remove(&ac(2)).await.unwrap();
    assert!(store.get(&ac(2)).await.unwrap().is_none());

    // 10k keys go in several pipelines and come back in order.
    let keys: Vec<Key> = (0..10_000u32)
        .map(|i| Key::Cas(lre_test_support::sha(&i.to_le_bytes())))
        .collect();
    set(&store, keys[9_999], b"last").await.unwrap();
    let found = store.lookup(&keys).await.unwrap();
    assert_eq!(found.len(), 10_000);
    assert_eq!(found.iter().filter(|f| f.is_some()).count(), 1);
    assert_eq!(found[9_999], Some(4));

    // The same hash as a BLAKE3 key is another entry, listed under its own kind.
    let b3 = Key::Blake3Cas(*keys[9_999].hash());
    assert_eq!(store.lookup(&[b3]).await.unwrap(), vec![None]);
    set(&store, b3, b"blake3").await.unwrap();
    assert_eq!(
        store.lookup(&[b3, keys[9_999]]).await.unwrap(),
        vec![Some(6), Some(4)]
    );
    assert_eq!(store.list(KeyKind::Blake3Cas).await.unwrap(), vec![b3]);
    assert!(!store.list(KeyKind::Cas).await.unwrap().contains(&b3));

    // A Nix binary cache's narinfo: per instance, its own kind.
    let ni = Key::nar_info("main", "0c6kzph7l0dcbfmjap64f0czdafn3b7x");
    assert_ne!(ni, Key::nar_info("", "0c6kzph7l0dcbfmjap64f0czdafn3b7x"));
    set(&store, ni, b"StorePath: x").await.unwrap();
    assert_eq!(store.get(&ni).await.unwrap().unwrap(), &b"StorePath: x"[..]);
    assert_eq!(store.list(KeyKind::NarInfo).await.unwrap(), vec![ni]);
    assert!(!store.list(KeyKind::Ac).await.unwrap().contains(&ni));
}

#[tokio::test]
async fn a_written_entry_is_invisible_until_committed_and_a_dropped_one_never_appears() {
    let redis = Redis::up(&[]);
    let store = RedisStore::open(&config(&redis.url)).await.unwrap();
    let mut w = store.writer(None).await.unwrap();
    w.write(b"half").await.unwrap();
    assert!(store.get(&ac(1)).await.unwrap().is_none());
    drop(w);
    assert!(store.get(&ac(1)).await.unwrap().is_none());
}

#[tokio::test]
async fn oversized_entries_and_a_spent_budget_are_refused() {
    let redis = Redis::up(&[]);
    let mut c = config(&redis.url);
    c.max_blob_size = lre_store::config::ByteSize(1024);
    c.max_in_flight = lre_store::config::ByteSize(1536);
    let store = RedisStore::open(&c).await.unwrap();
    assert!(matches!(
        store.writer(Some(1025)).await.err(),
        Some(StoreError::InvalidArgument(_))
    ));
    let mut w = store.writer(None).await.unwrap();
    let e = w.write(&[0; 1025]).await.unwrap_err();
    assert!(
        matches!(e, StoreError::InvalidArgument(ref m) if m.contains("max_blob_size")),
        "{e}"
    );

    let mut a = store.writer(None).await.unwrap();
    a.write(&[1; 1024]).await.unwrap();
    let mut b = store.writer(None).await.unwrap();
    let e = b.write(&[2; 1024]).await.unwrap_err();
    assert!(matches!(e, StoreError::UploadSpaceExhausted { .. }), "{e}");
    drop(a);
    b.write(&[2; 1024]).await.unwrap();
    b.commit(ac(7)).await.unwrap();
    assert_eq!(store.lookup(&[ac(7)]).await.unwrap(), vec![Some(1024)]);
}

#[tokio::test]
async fn an_unreachable_redis_at_start_is_an_error_naming_it() {
    let port = dead_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let e = RedisStore::open(&config(&url))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    assert!(
        e.to_string().contains(&url),
        "the message names the server: {e}"
    );
}

#[tokio::test]
async fn a_password_is_read_from_its_file_and_a_wrong_one_fails_at_start() {
    let secret = format!("pw-{}", std::process::id() as u64 * 7919 + 1234567);
    let redis = Redis::up(&["--requirepass", &secret]);
    let e = RedisStore::open(&config(&redis.url))
        .await
        .err()
        .expect("no password");
    assert!(e.to_string().contains(&redis.url), "{e}");
    let file = redis.dir().join("password");
    let wrong = format!("{secret}-not-it");
    std::fs::write(&file, format!("{wrong}\n")).unwrap();
    let mut c = config(&redis.url);
    c.password_file = Some(file.clone());
    let e = RedisStore::open(&c).await.err().expect("wrong password");
    assert!(
        !e.to_string().contains(&wrong),
        "the password is not echoed: {e}"
    );
    assert!(e.to_string().contains(&redis.url), "{e}");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let store = RedisStore::open(&c).await.unwrap();
    set(&store, ac(1), b"ok").await.unwrap();
    assert_eq!(
        store.get(&ac(1)).await.unwrap().as_deref(),
        Some(&b"ok"[..])
    );
}

/// While Redis is gone every call fails as UNAVAILABLE (never a miss that would make a
/// client rebuild, never a partial entry), and the store recovers once Redis is back.
#[tokio::test]
async fn a_redis_that_goes_away_is_unavailable_and_the_store_recovers() {
    let redis = Redis::up(&[]);
    let store = RedisStore::open(&config(&redis.url)).await.unwrap();
    set(&store, ac(1), b"before").await.unwrap();
    redis.kill();
    for _ in 0..3 {
        let e = store.get(&ac(1)).await.expect_err("Redis is down");
        assert!(
            matches!(e, StoreError::Unavailable(ref m) if m.contains(&redis.url)),
            "{e}"
        );
        assert_eq!(e.grpc_code(), tonic::Code::Unavailable);
    }
    assert!(matches!(
        store.lookup(&[ac(1)]).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        set(&store, ac(2), b"x").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.remove(&ac(1)).await,
        Err(StoreError::Unavailable(_))
    ));

    redis.start();
    let mut recovered = None;
    for _ in 0..50 {
        match set(&store, ac(3), b"after").await {
            Ok(()) => {
                recovered = Some(());
                break;
            }
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("unexpected error while reconnecting: {e}"),
        }
    }
    recovered.expect("the store reconnects to the restarted Redis");
    assert_eq!(
        store.get(&ac(3)).await.unwrap().as_deref(),
        Some(&b"after"[..])
    );
    assert!(
        store.get(&ac(1)).await.unwrap().is_none(),
        "a Redis without persistence lost its data: a miss, not an error"
    );
}

/// A Redis that accepts connections but answers nothing (stopped, swapping, partitioned)
/// must not hang the client: the call ends as UNAVAILABLE after request_timeout.
#[tokio::test]
async fn a_redis_that_stops_answering_is_unavailable_not_a_hang() {
    let redis = Redis::up(&[]);
    let mut c = config(&redis.url);
    c.request_timeout_seconds = 1;
    let store = RedisStore::open(&c).await.unwrap();
    set(&store, ac(1), b"x").await.unwrap();
    let pid = std::fs::read_to_string(redis.dir().join("pid")).unwrap();
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, pid.trim()])
            .status()
            .unwrap()
            .success())
    };
    signal("-STOP");
    let got = tokio::time::timeout(Duration::from_secs(30), store.get(&ac(1))).await;
    signal("-CONT");
    let e = got
        .expect("bounded by request_timeout, not the test's 30 s")
        .unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    assert_eq!(
        get_when_back(&store, ac(1)).await.as_deref(),
        Some(&b"x"[..]),
        "answers again once Redis does"
    );
}

#[tokio::test]
async fn a_full_redis_is_resource_exhausted() {
    let redis = Redis::up(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let store = RedisStore::open(&config(&redis.url)).await.unwrap();
    let mut full = None;
    for i in 0..64u8 {
        if let Err(e) = set(&store, ac(i), &[i; 256 << 10]).await {
            full = Some(e);
            break;
        }
    }
    let e = full.expect("2 MiB of Redis fills up");
    assert!(matches!(e, StoreError::StorageFull(_)), "{e}");
    assert_eq!(e.grpc_code(), tonic::Code::ResourceExhausted);
    let stored = store
        .lookup(&(0..64).map(ac).collect::<Vec<_>>())
        .await
        .unwrap();
    let first = stored
        .iter()
        .position(|s| s.is_some())
        .expect("some writes fit first");
    assert_eq!(
        store.get(&ac(first as u8)).await.unwrap().map(|v| v.len()),
        Some(256 << 10),
        "what was stored is still served"
    );
}

#[tokio::test]
async fn expire_seconds_sets_and_refreshes_a_ttl() {
    let redis = Redis::up(&[]);
    let mut c = config(&redis.url);
    c.expire_seconds = Some(1000);
    let store = RedisStore::open(&c).await.unwrap();
    set(&store, ac(1), b"x").await.unwrap();
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let ttl = |raw: &mut redis::aio::MultiplexedConnection| {
        let mut raw = raw.clone();
        let key = format!("lre:{}", ac(1));
        async move {
            redis::cmd("TTL")
                .arg(key)
                .query_async::<i64>(&mut raw)
                .await
                .unwrap()
        }
    };
    assert!((990..=1000).contains(&ttl(&mut raw).await));
    redis::cmd("EXPIRE")
        .arg(format!("lre:{}", ac(1)))
        .arg(5)
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    store.get(&ac(1)).await.unwrap().expect("present");
    assert!(ttl(&mut raw).await > 5, "a read refreshes the TTL");
    redis::cmd("EXPIRE")
        .arg(format!("lre:{}", ac(1)))
        .arg(5)
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    store.lookup(&[ac(1)]).await.unwrap();
    assert!(ttl(&mut raw).await > 5, "a lookup refreshes the TTL");
}

/// A user the ACL does not allow the store's commands: refused at start (the probe), as a
/// misconfiguration (not retryable), naming the server.
#[tokio::test]
async fn a_user_without_the_commands_it_needs_is_refused_at_start() {
    let redis = Redis::up(&[
        "--user",
        "reader",
        "on",
        ">reader-pw",
        "~*",
        "+ping",
        "+get",
        "+hello",
        "+client",
    ]);
    let file = redis.dir().join("password");
    std::fs::write(&file, "reader-pw").unwrap();
    let mut c = config(&redis.url);
    c.username = Some("reader".into());
    c.password_file = Some(file);
    let e = RedisStore::open(&c)
        .await
        .err()
        .expect("SET is not allowed");
    assert!(matches!(e, StoreError::Internal(_)), "{e}");
    assert!(
        e.to_string().contains(&redis.url) && e.to_string().to_lowercase().contains("noperm"),
        "{e}"
    );
}

/// Copies `from` to `to` while connection `id` is not black-holed; after, reads and drops.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    dead_before: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        let live = id >= dead_before.load(std::sync::atomic::Ordering::SeqCst);
        if live && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A connection that goes silent without breaking (a partition, a NAT or load balancer
/// dropping it, a crashed host): the call is UNAVAILABLE after request_timeout, and the
/// store dials a new connection instead of waiting on the dead one forever.
#[tokio::test]
async fn a_connection_that_goes_silent_is_replaced() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let redis = Redis::up(&[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    // Connections numbered below `dead_before` are black-holed: their bytes are read (so
    // TCP acknowledges them) and dropped, in both directions, and the socket stays open.
    let dead_before = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let upstream = format!("127.0.0.1:{}", redis.port);
    {
        let (dead_before, accepted) = (dead_before.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let id = accepted.fetch_add(1, Ordering::SeqCst);
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, id, dead_before.clone()));
                tokio::spawn(pump(sr, cw, id, dead_before.clone()));
            }
        });
    }
    let mut c = config(&format!("redis://{proxy}/0"));
    c.request_timeout_seconds = 1;
    let store = RedisStore::open(&c).await.unwrap();
    set(&store, ac(1), b"through the proxy").await.unwrap();

    dead_before.store(accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    let e = tokio::time::timeout(Duration::from_secs(30), store.get(&ac(1)))
        .await
        .expect("bounded by request_timeout")
        .unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");

    assert_eq!(
        get_when_back(&store, ac(1)).await.as_deref(),
        Some(&b"through the proxy"[..]),
        "a new connection is dialled instead of waiting on the silent one"
    );
    assert!(accepted.load(Ordering::SeqCst) >= 2, "it dialled again");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in
/// `dir`; and a second, unrelated CA.
fn pki(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca = |file: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name.push(DnType::CommonName, file);
        std::fs::write(dir.join(file), p.self_signed(&key).unwrap().pem()).unwrap();
        Issuer::new(p, key)
    };
    let issuer = ca("ca.crt");
    ca("other-ca.crt");
    for (name, sans, eku) in [
        (
            "server",
            vec!["127.0.0.1".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            "client",
            vec!["lre.test".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.extended_key_usages = vec![eku];
        std::fs::write(
            dir.join(format!("{name}.crt")),
            p.signed_by(&key, &issuer).unwrap().pem(),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// `rediss://`: the server is verified against `tls_ca_file`, and presents a client
/// certificate when Redis asks for one. A wrong CA, a missing client certificate and plain
/// TCP to a TLS port are refused at start, naming the server.
#[tokio::test]
async fn redis_over_tls_verifies_the_server_and_presents_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let path = |f: &str| dir.path().join(f);
    let s = |f: &str| path(f).to_str().unwrap().to_owned();
    let (cert, key, ca) = (s("server.crt"), s("server.key"), s("ca.crt"));
    let redis = Redis::up(&[
        "--port",
        "0",
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "yes",
    ]);
    assert!(redis.url.starts_with("rediss://"), "{}", redis.url);
    let mut c = config(&redis.url);
    c.tls_ca_file = Some(path("ca.crt"));
    c.tls_client_cert_file = Some(path("client.crt"));
    c.tls_client_key_file = Some(path("client.key"));
    let store = RedisStore::open(&c).await.unwrap();
    set(&store, ac(1), b"over tls").await.unwrap();
    assert_eq!(
        store.get(&ac(1)).await.unwrap().as_deref(),
        Some(&b"over tls"[..])
    );

    let mut no_client_cert = c.clone();
    no_client_cert.tls_client_cert_file = None;
    no_client_cert.tls_client_key_file = None;
    let e = RedisStore::open(&no_client_cert)
        .await
        .err()
        .expect("Redis wants a client cert");
    assert!(e.to_string().contains(&redis.url), "{e}");

    let mut wrong_ca = c.clone();
    wrong_ca.tls_ca_file = Some(path("other-ca.crt"));
    let e = RedisStore::open(&wrong_ca)
        .await
        .err()
        .expect("the server is not trusted");
    assert!(e.to_string().contains(&redis.url), "{e}");

    let plain = config(&redis.url.replace("rediss://", "redis://"));
    let e = tokio::time::timeout(Duration::from_secs(30), RedisStore::open(&plain))
        .await
        .expect("bounded")
        .err()
        .expect("plain TCP to a TLS port");
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
}
