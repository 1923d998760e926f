//! The fast/slow layer over two real memory stores: what happens when the fast tier cannot
//! take a blob, when the slow tier holds a corrupt one, and when the slow tier refuses a
//! write for lack of room. (Against Garage: tests/garage.rs.)

use std::sync::Arc;

use lre_store::metrics::StoreMetrics;
use lre_store::store::{BlobStore, CasUpload, FastSlowStore, Key, MemStore};
use lre_store::StoreError;
use tokio::io::AsyncReadExt;

use lre_test_support::{noise, put, read_all, sha};

fn mem(capacity: u64) -> Arc<MemStore> {
    Arc::new(MemStore::new(capacity, StoreMetrics::default()))
}

#[tokio::test]
async fn a_blob_too_big_for_the_fast_tier_is_served_from_the_slow_one_verified() {
    let (fast, slow) = (mem(1 << 20), mem(64 << 20));
    let tiers = FastSlowStore::new(fast.clone(), slow.clone());
    let data = noise(3 << 20, 1);
    let k = put(slow.as_ref(), &data).await; // written by a replica with a bigger fast tier
    assert_eq!(tiers.lookup(&[k]).await.unwrap(), vec![Some(3 << 20)]);
    assert!(read_all(&tiers, &k, 0).await.unwrap() == data);
    assert!(read_all(&tiers, &k, 1_000_001).await.unwrap() == data[1_000_001..]);
    assert!(tiers.get(&k).await.unwrap().unwrap() == data);
    assert_eq!(fast.lookup(&[k]).await.unwrap(), vec![None]);

    // The same path with other bytes under the name: never a clean read.
    let name = Key::Cas(sha(b"what the name promises"));
    let mut w = slow.writer(None).await.unwrap();
    w.write(&noise(2 << 20, 2)).await.unwrap();
    w.commit(name).await.unwrap();
    let (_, mut r) = tiers.open(&name, 0, None).await.unwrap().expect("present");
    let mut sink = Vec::new();
    let e = r.read_to_end(&mut sink).await.unwrap_err();
    assert!(e.to_string().contains("hashes to"), "{e}");
    assert!(tiers.get(&name).await.unwrap().is_none());
    assert_eq!(
        slow.lookup(&[name]).await.unwrap(),
        vec![None],
        "the corrupt copy must be deleted"
    );
}

#[tokio::test]
async fn a_write_the_slow_tier_refuses_for_room_can_be_retried_as_it_was() {
    let (fast, slow) = (mem(64 << 20), mem(1 << 20));
    let tiers = FastSlowStore::new(fast.clone(), slow.clone());
    // Another upload holds all of the slow tier's room.
    let mut hog = slow.writer(None).await.unwrap();
    hog.write(&vec![0u8; 1 << 20]).await.unwrap();

    let data = noise(600_000, 3);
    let mut up = CasUpload::for_key(&tiers, Key::Cas(sha(&data)), Some(data.len() as u64))
        .await
        .unwrap();
    let e = up.write(&data).await.unwrap_err();
    assert!(matches!(e, StoreError::UploadSpaceExhausted { .. }), "{e}");
    drop(hog); // the room comes back, as when an idle upload is dropped
    up.write(&data).await.expect("the same write, retried");
    let d = up.finish().await.expect("finish");
    let k = Key::cas(&d);
    assert!(read_all(fast.as_ref(), &k, 0).await.unwrap() == data);
    assert!(read_all(slow.as_ref(), &k, 0).await.unwrap() == data);

    // And when it is the fast tier that has no room.
    let (fast, slow) = (mem(1 << 20), mem(64 << 20));
    let tiers = FastSlowStore::new(fast.clone(), slow.clone());
    let mut hog = fast.writer(None).await.unwrap();
    hog.write(&vec![0u8; 1 << 20]).await.unwrap();
    let data = noise(700_000, 4);
    let mut up = CasUpload::for_key(&tiers, Key::Cas(sha(&data)), Some(data.len() as u64))
        .await
        .unwrap();
    let e = up.write(&data).await.unwrap_err();
    assert!(matches!(e, StoreError::UploadSpaceExhausted { .. }), "{e}");
    drop(hog);
    up.write(&data).await.expect("the same write, retried");
    let k = Key::cas(&up.finish().await.expect("finish"));
    assert!(read_all(slow.as_ref(), &k, 0).await.unwrap() == data);
    assert!(read_all(fast.as_ref(), &k, 0).await.unwrap() == data);
}
