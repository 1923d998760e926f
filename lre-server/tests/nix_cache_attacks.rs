//! Every attack on the Nix binary cache from the design notes, built byte by byte here
//! (NARs, narinfos and signatures from `lre-nix-formats`, whose formats are proven
//! against the nix CLI in that crate's tests), each refused with a reason and leaving
//! nothing served.

mod common;

use base64::Engine as _;
use common::*;
use lre_nix_formats::nar::write;
use lre_nix_formats::{nixbase32, NixHash, SecretKey, StorePath};
use lre_server::auth::Scope;
use lre_server::config::{ByteSize, InstanceSettings};
use lre_store::store::Key;
use reqwest::StatusCode;

fn secret_key(name: &str, seed: u8) -> SecretKey {
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    let pair = Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
    let mut bytes = vec![seed; 32];
    bytes.extend_from_slice(pair.public_key().as_ref());
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    SecretKey::parse(&format!("{name}:{b64}")).unwrap()
}

fn file_nar(contents: &[u8]) -> Vec<u8> {
    write::archive(write::regular(contents, false))
}

/// A directory NAR with the given entry names (each a one-byte file), in the given order.
fn dir_nar(names: &[&str]) -> Vec<u8> {
    let entries: Vec<(&str, Vec<u8>)> = names
        .iter()
        .map(|n| (*n, write::regular(b"x", false)))
        .collect();
    write::archive(write::directory(&entries))
}

fn random_path(name: &str) -> StorePath {
    let h = NixHash::of(format!("{name}{:?}", std::time::Instant::now()).as_bytes());
    StorePath::from_base_name(&format!("{}-{name}", nixbase32::encode(&h.0[..20]))).unwrap()
}

struct Info<'a> {
    path: &'a StorePath,
    nar: &'a [u8],
    refs: Vec<&'a StorePath>,
    signers: Vec<&'a SecretKey>,
    ca: Option<String>,
}

impl Info<'_> {
    fn render(&self) -> String {
        let h = NixHash::of(self.nar);
        let mut refs: Vec<&StorePath> = self.refs.clone();
        refs.sort_by_key(|r| r.base_name());
        let full: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
        let fp = format!(
            "1;{};{};{};{}",
            self.path,
            h,
            self.nar.len(),
            full.join(",")
        );
        let base: Vec<String> = refs.iter().map(|r| r.base_name()).collect();
        let mut s = format!(
            "StorePath: {}\nURL: nar/{}.nar\nCompression: none\nFileHash: {h}\nFileSize: {}\n\
             NarHash: {h}\nNarSize: {}\nReferences: {}\n",
            self.path,
            h.base32(),
            self.nar.len(),
            self.nar.len(),
            base.join(" ")
        );
        for k in &self.signers {
            s.push_str(&format!("Sig: {}\n", k.sign(&fp)));
        }
        if let Some(ca) = &self.ca {
            s.push_str(&format!("CA: {ca}\n"));
        }
        s
    }
}

struct Cache {
    base: String,
    http: reqwest::Client,
}

impl Cache {
    async fn put(&self, path: &str, body: Vec<u8>) -> (StatusCode, String) {
        let r = self
            .http
            .put(format!("{}{path}", self.base))
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    async fn put_nar(&self, prefix: &str, nar: &[u8]) -> (StatusCode, String) {
        self.put(
            &format!("{prefix}/nix/nar/{}.nar", NixHash::of(nar).base32()),
            nar.to_vec(),
        )
        .await
    }

    async fn put_info(&self, prefix: &str, info: &Info<'_>) -> (StatusCode, String) {
        self.put(
            &format!("{prefix}/nix/{}.narinfo", info.path.hash_part()),
            info.render().into_bytes(),
        )
        .await
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap_or_default())
    }

    async fn narinfo(&self, p: &StorePath) -> (StatusCode, String) {
        self.get(&format!("/nix/{}.narinfo", p.hash_part())).await
    }

    async fn has_nar(&self, nar: &[u8]) -> bool {
        let url = format!("{}/nix/nar/{}.nar", self.base, NixHash::of(nar).base32());
        self.http.head(url).send().await.unwrap().status() == StatusCode::OK
    }
}

#[tokio::test]
async fn every_attack_is_refused_with_a_reason_and_nothing_is_served() {
    let trusted = secret_key("trusted-1", 1);
    let trusted2 = secret_key("trusted-2", 2);
    let stranger = secret_key("stranger", 3);
    let mut config = memory_config();
    config.auth.tokens = vec![token(
        "other",
        "other-secret",
        Scope::ReadWrite,
        Some(vec!["other"]),
    )];
    let mut settings = InstanceSettings::default();
    settings.nix.trusted_public_keys =
        vec![trusted.public().to_string(), trusted2.public().to_string()];
    config.instance_settings.insert("".into(), settings.clone());
    settings.nix.max_nar_size = ByteSize(1 << 20);
    config.instance_settings.insert("tiny".into(), settings);
    let server = start(config).await;
    let c = Cache {
        base: http_url(&server),
        http: reqwest::Client::new(),
    };

    let (s, body) = c.get("/nix/nix-cache-info").await;
    assert_eq!(
        (s, body.contains("StoreDir: /nix/store")),
        (StatusCode::OK, true)
    );

    // A genuine signed path, and what is served for it.
    let good = random_path("good");
    let good_nar = file_nar(b"genuine contents");
    assert_eq!(c.put_nar("", &good_nar).await.0, StatusCode::OK);
    let info = Info {
        path: &good,
        nar: &good_nar,
        refs: vec![],
        signers: vec![&trusted],
        ca: None,
    };
    assert_eq!(c.put_info("", &info).await, (StatusCode::OK, String::new()));
    let (s, served) = c.narinfo(&good).await;
    assert_eq!(s, StatusCode::OK);
    let nar_url = format!("nar/{}.nar", NixHash::of(&good_nar).base32());
    assert!(
        served.contains(&format!("URL: {nar_url}")) && served.contains("Sig: trusted-1:"),
        "{served}"
    );
    let r = c
        .http
        .get(format!("{}/nix/{nar_url}", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().to_vec(), good_nar);

    // An unsigned input-addressed path.
    let p = random_path("unsigned");
    let nar = file_nar(b"unsigned");
    c.put_nar("", &nar).await;
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &p,
                nar: &nar,
                refs: vec![],
                signers: vec![],
                ca: None,
            },
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        why.contains("not signed by a trusted key") && why.contains("secret-key"),
        "{why}"
    );
    assert_eq!(c.narinfo(&p).await.0, StatusCode::NOT_FOUND);

    // Signed by a key the instance does not trust.
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &p,
                nar: &nar,
                refs: vec![],
                signers: vec![&stranger],
                ca: None,
            },
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{why}");
    assert!(why.contains("trusts trusted-1, trusted-2"), "{why}");
    assert_eq!(c.narinfo(&p).await.0, StatusCode::NOT_FOUND);

    // A forged content address: the NAR's hash, under a path it does not make.
    let ca = format!("fixed:r:{}", NixHash::of(&nar));
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &p,
                nar: &nar,
                refs: vec![],
                signers: vec![],
                ca: Some(ca.clone()),
            },
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        why.contains("content address") && why.contains("makes the path"),
        "{why}"
    );
    assert_eq!(c.narinfo(&p).await.0, StatusCode::NOT_FOUND);
    // The genuine content address of the same NAR is accepted without any signature.
    let ca_path = StorePath::make("source", &NixHash::of(&nar), "ca-source").unwrap();
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &ca_path,
                nar: &nar,
                refs: vec![],
                signers: vec![],
                ca: Some(ca),
            },
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{why}");

    // Tampered NAR bytes: the body does not hash to its name; nothing is stored, and a
    // narinfo naming the genuine NAR cannot be accepted without it.
    let genuine = file_nar(b"the real toolchain");
    let mut tampered = genuine.clone();
    // The last byte of the contents (18 bytes, then 6 of padding and the closing ")").
    let at = tampered.len() - 16 - 6 - 1;
    tampered[at] ^= 1;
    let name = format!("/nix/nar/{}.nar", NixHash::of(&genuine).base32());
    let (s, why) = c.put(&name, tampered.clone()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        why.contains("hashes to") && why.contains("nothing was stored"),
        "{why}"
    );
    assert!(!c.has_nar(&tampered).await && !c.has_nar(&genuine).await);
    let p2 = random_path("tampered");
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &p2,
                nar: &genuine,
                refs: vec![],
                signers: vec![&trusted],
                ca: None,
            },
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(why.contains("upload nar/ first"), "{why}");

    // A second, different NAR for an existing path, even signed by a trusted key.
    let other_nar = file_nar(b"replacement contents");
    c.put_nar("", &other_nar).await;
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &good,
                nar: &other_nar,
                refs: vec![],
                signers: vec![&trusted],
                ca: None,
            },
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        why.contains("already in this cache with other contents"),
        "{why}"
    );
    assert!(c.narinfo(&good).await.1.contains(&nar_url));
    // The same NAR with another trusted signature merges the signatures.
    let again = Info {
        path: &good,
        nar: &good_nar,
        refs: vec![],
        signers: vec![&trusted2],
        ca: None,
    };
    assert_eq!(c.put_info("", &again).await.0, StatusCode::OK);
    let served = c.narinfo(&good).await.1;
    assert!(
        served.contains("Sig: trusted-1:") && served.contains("Sig: trusted-2:"),
        "{served}"
    );

    // A genuine signature cannot carry a forged content address: the fingerprint does not
    // cover CA:, so the server checks it anyway.
    let p5 = random_path("signed-bogus-ca");
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &p5,
                nar: &nar,
                refs: vec![],
                signers: vec![&trusted],
                ca: Some(format!("fixed:r:{}", NixHash::of(&nar))),
            },
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(why.contains("claims content address"), "{why}");
    assert_eq!(c.narinfo(&p5).await.0, StatusCode::NOT_FOUND);

    // A reference is matched by its whole name: a path with the same hash part and another
    // name is not it.
    let impostor = StorePath::from_base_name(&format!("{}-impostor", good.hash_part())).unwrap();
    let p6 = random_path("refers-to-impostor");
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &p6,
                nar: &nar,
                refs: vec![&impostor],
                signers: vec![&trusted],
                ca: None,
            },
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{why}");
    assert!(why.contains("impostor"), "{why}");

    // A narinfo whose references are not in the cache.
    let missing = random_path("never-uploaded");
    let p3 = random_path("dangling");
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &p3,
                nar: &nar,
                refs: vec![&missing],
                signers: vec![&trusted],
                ca: None,
            },
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        why.contains("refers to") && why.contains("never-uploaded"),
        "{why}"
    );
    assert_eq!(c.narinfo(&p3).await.0, StatusCode::NOT_FOUND);
    // With the reference present it is accepted.
    let with_ref = Info {
        path: &p3,
        nar: &nar,
        refs: vec![&good, &p3],
        signers: vec![&trusted],
        ca: None,
    };
    assert_eq!(c.put_info("", &with_ref).await.0, StatusCode::OK);

    // Hostile NARs: refused as they stream in, nothing in the CAS.
    for (what, nar) in [
        ("traversal", dir_nar(&[".."])),
        ("slash", dir_nar(&["a/../../etc"])),
        ("duplicate", dir_nar(&["a", "a"])),
        ("unsorted", dir_nar(&["b", "a"])),
    ] {
        let (s, why) = c.put_nar("", &nar).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}");
        assert!(
            why.contains("bad NAR") && why.contains("nothing was stored"),
            "{what}: {why}"
        );
        assert!(!c.has_nar(&nar).await, "{what}");
    }
    // The same NAR put straight into the CAS is still refused when a narinfo names it.
    let trav = dir_nar(&[".."]);
    assert_eq!(
        c.put(&format!("/cas/{}", hash_hex(&trav)), trav.clone())
            .await
            .0,
        StatusCode::OK
    );
    let p4 = random_path("through-the-cas");
    let (s, why) = c
        .put_info(
            "",
            &Info {
                path: &p4,
                nar: &trav,
                refs: vec![],
                signers: vec![&trusted],
                ca: None,
            },
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.contains("its NAR is refused"), "{why}");
    assert_eq!(c.narinfo(&p4).await.0, StatusCode::NOT_FOUND);

    // A decompression bomb: 64 MiB of zeros, zstd-compressed to a few KiB, against an
    // instance whose NARs may be 1 MiB.
    let bomb_nar = file_nar(&vec![0u8; 64 << 20]);
    let bomb = zstd::encode_all(&bomb_nar[..], 19).unwrap();
    assert!(bomb.len() < 64 << 10);
    let (s, why) = c
        .put(
            &format!("/tiny/nix/nar/{}.nar.zst", NixHash::of(&bomb).base32()),
            bomb,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.contains("limit of 1048576 bytes"), "{why}");
    assert!(!c.has_nar(&bomb_nar).await);
    // A zstd NAR within bounds is stored uncompressed under its NarHash.
    let small = file_nar(b"compressed on the wire");
    let z = zstd::encode_all(&small[..], 3).unwrap();
    let (s, why) = c
        .put(
            &format!("/tiny/nix/nar/{}.nar.zst", NixHash::of(&z).base32()),
            z,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{why}");
    assert!(c.has_nar(&small).await);

    // A truncated upload under the full NAR's name.
    let whole = file_nar(&vec![7u8; 100_000]);
    let name = format!("/nix/nar/{}.nar", NixHash::of(&whole).base32());
    let (s, why) = c.put(&name, whole[..50_000].to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.contains("truncated"), "{why}");
    assert!(!c.has_nar(&whole).await);

    // A compression lre does not take: 415, whose body Nix shows.
    let (s, why) = c
        .put(
            &format!("/nix/nar/{}.nar.bz2", NixHash::of(b"x").base32()),
            vec![1],
        )
        .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(why.contains("compression=zstd"), "{why}");

    // A narinfo uploaded under another path's name.
    let body = Info {
        path: &good,
        nar: &good_nar,
        refs: vec![],
        signers: vec![&trusted],
        ca: None,
    }
    .render();
    let (s, _) = c
        .put(
            &format!("/nix/{}.narinfo", p2.hash_part()),
            body.into_bytes(),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // A token of another instance gets nothing here.
    let r = c
        .http
        .put(format!("{}/nix/{}.narinfo", c.base, p2.hash_part()))
        .basic_auth("other", Some("other-secret"))
        .body(
            Info {
                path: &p2,
                nar: &good_nar,
                refs: vec![],
                signers: vec![&trusted],
                ca: None,
            }
            .render(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(c.narinfo(&p2).await.0, StatusCode::NOT_FOUND);

    // A narinfo whose NAR left the CAS is not served (Nix would fail hard on it).
    server
        .context
        .store
        .remove(&Key::Cas(NixHash::of(&good_nar).0))
        .await
        .unwrap();
    assert_eq!(c.narinfo(&good).await.0, StatusCode::NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn narinfos_survive_a_restart_of_a_filesystem_store_and_stay_per_instance() {
    let key = secret_key("trusted-1", 1);
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = fs_config(dir.path(), 1 << 30);
        let mut s = InstanceSettings::default();
        s.nix.trusted_public_keys = vec![key.public().to_string()];
        c.instance_settings.insert("team".into(), s);
        c
    };
    let path = random_path("kept");
    let nar = file_nar(b"kept across a restart");
    let server = start(config()).await;
    let c = Cache {
        base: http_url(&server),
        http: reqwest::Client::new(),
    };
    assert_eq!(c.put_nar("/team", &nar).await.0, StatusCode::OK);
    let info = Info {
        path: &path,
        nar: &nar,
        refs: vec![],
        signers: vec![&key],
        ca: None,
    };
    assert_eq!(c.put_info("/team", &info).await.0, StatusCode::OK);
    server.shutdown().await;

    let server = start(config()).await;
    let c = Cache {
        base: http_url(&server),
        http: reqwest::Client::new(),
    };
    let (s, served) = c
        .get(&format!("/team/nix/{}.narinfo", path.hash_part()))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(served.contains(&path.to_string()), "{served}");
    // The default instance is another cache: it has no narinfo for the path (the NAR,
    // a CAS blob, is shared).
    assert_eq!(c.narinfo(&path).await.0, StatusCode::NOT_FOUND);
    assert!(c.has_nar(&nar).await);
    server.shutdown().await;
}

#[tokio::test]
async fn a_closure_manifest_must_hash_to_its_id_be_complete_and_closed() {
    use sha2::{Digest as _, Sha256};
    let key = secret_key("trusted-1", 1);
    let mut config = memory_config();
    let mut s = InstanceSettings::default();
    s.nix.trusted_public_keys = vec![key.public().to_string()];
    config.instance_settings.insert("".into(), s);
    let server = start(config).await;
    let c = Cache {
        base: http_url(&server),
        http: reqwest::Client::new(),
    };
    let (dep, top) = (random_path("dep"), random_path("top"));
    let (dep_nar, top_nar) = (file_nar(b"dep"), file_nar(b"top"));
    for (p, nar, refs) in [(&dep, &dep_nar, vec![]), (&top, &top_nar, vec![&dep])] {
        c.put_nar("", nar).await;
        let info = Info {
            path: p,
            nar,
            refs,
            signers: vec![&key],
            ca: None,
        };
        assert_eq!(c.put_info("", &info).await.0, StatusCode::OK);
    }
    let manifest = |paths: &[&StorePath]| {
        let mut v: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        v.sort();
        let body: String = v.iter().map(|p| format!("{p}\n")).collect();
        (hex::encode(Sha256::digest(body.as_bytes())), body)
    };
    let put = |id: String, body: String| {
        let c = &c;
        async move {
            c.put(&format!("/nix/closure/{id}"), body.into_bytes())
                .await
        }
    };

    // Not the SHA-256 of its body.
    let (_, body) = manifest(&[&dep, &top]);
    let (s, why) = put("ab".repeat(32), body.clone()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.contains("hashes to"), "{why}");
    // Not closed: top refers to dep, which it leaves out.
    let (id, only_top) = manifest(&[&top]);
    let (s, why) = put(id.clone(), only_top).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.contains("leaves out"), "{why}");
    assert_eq!(
        c.get(&format!("/nix/closure/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    // A path the cache does not have.
    let stranger = random_path("absent");
    let (id, body_absent) = manifest(&[&dep, &stranger]);
    let (s, why) = put(id, body_absent).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(why.contains("not in this cache"), "{why}");
    // Unsorted.
    let unsorted: String = {
        let mut v = [dep.to_string(), top.to_string()];
        v.sort();
        v.reverse();
        v.iter().map(|p| format!("{p}\n")).collect()
    };
    let (s, why) = put(hex::encode(Sha256::digest(unsorted.as_bytes())), unsorted).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(why.contains("sorted"), "{why}");

    // The real one, then withheld once a NAR of it is evicted.
    let (id, body) = manifest(&[&dep, &top]);
    assert_eq!(put(id.clone(), body.clone()).await.0, StatusCode::OK);
    assert_eq!(
        c.get(&format!("/nix/closure/{id}")).await,
        (StatusCode::OK, body)
    );
    server
        .context
        .store
        .remove(&Key::Cas(NixHash::of(&dep_nar).0))
        .await
        .unwrap();
    let (s, why) = c.get(&format!("/nix/closure/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(why.contains("lre publish"), "{why}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_removed_from_the_trusted_keys_stops_vouching_for_what_it_signed() {
    let (old_key, new_key) = (secret_key("old-1", 7), secret_key("new-1", 8));
    let dir = tempfile::tempdir().unwrap();
    let config = |keys: &[&SecretKey]| {
        let mut c = fs_config(dir.path(), 1 << 30);
        let mut s = InstanceSettings::default();
        s.nix.trusted_public_keys = keys.iter().map(|k| k.public().to_string()).collect();
        c.instance_settings.insert("".into(), s);
        c
    };
    let path = random_path("rotated");
    let (nar, other_nar) = (
        file_nar(b"signed by the old key"),
        file_nar(b"the real contents"),
    );
    let server = start(config(&[&old_key])).await;
    let c = Cache {
        base: http_url(&server),
        http: reqwest::Client::new(),
    };
    c.put_nar("", &nar).await;
    let info = Info {
        path: &path,
        nar: &nar,
        refs: vec![],
        signers: vec![&old_key],
        ca: None,
    };
    assert_eq!(c.put_info("", &info).await.0, StatusCode::OK);
    server.shutdown().await;

    // The old key is no longer trusted (leaked, say): what only it signed is not served,
    // and a path signed by a trusted key may take its place.
    let server = start(config(&[&new_key])).await;
    let c = Cache {
        base: http_url(&server),
        http: reqwest::Client::new(),
    };
    assert_eq!(c.narinfo(&path).await.0, StatusCode::NOT_FOUND);
    c.put_nar("", &other_nar).await;
    let info = Info {
        path: &path,
        nar: &other_nar,
        refs: vec![],
        signers: vec![&new_key],
        ca: None,
    };
    let (s, why) = c.put_info("", &info).await;
    assert_eq!(s, StatusCode::OK, "{why}");
    let served = c.narinfo(&path).await.1;
    assert!(
        served.contains(&format!("NarHash: {}", NixHash::of(&other_nar))),
        "{served}"
    );
    assert!(!served.contains("old-1"), "{served}");
    server.shutdown().await;
}
