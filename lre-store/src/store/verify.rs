//! The `verify` layer (Buildbarn's read-time digest check): every CAS blob read through it
//! is hashed, and one whose bytes do not match its name is never served whole.
//!
//! - `get` hashes the blob before returning it: a mismatch reads as a miss (so the client
//!   uploads it again), and the bad copy is removed from the store below.
//! - `open` streams, hashing as it goes (from byte 0 even when the read starts later): a
//!   mismatch ends the read with an error in place of its EOF, never a clean end, and the
//!   copy is removed. Streaming is what lets it sit over S3 without reading blobs twice.
//! - A read that stops short of the end (a ByteStream `read_limit`) still gets a verdict:
//!   the last bytes of its range are held back while the rest of the blob is read and
//!   hashed, and handed out only if the whole blob matches.
//!
//! Action-cache entries are named by the request, not their content, and pass unchecked.
//! (The filesystem store's own `verify_on_read` checks a whole file before serving it, on
//! the descriptor it then serves from; this layer is for stores with no such shortcut.)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};

use super::{BlobReader, BlobStore, BlobWriter, Key, KeyKind};
use crate::digest::Hasher;
use crate::error::{Result, StoreError as Error};

/// Bytes skipped before a read's offset are read into this much scratch at a time.
const SKIP_CHUNK: usize = 64 << 10;

pub struct VerifyStore {
    inner: Arc<dyn BlobStore>,
}

impl VerifyStore {
    pub fn new(inner: Arc<dyn BlobStore>) -> VerifyStore {
        VerifyStore { inner }
    }
}

/// Removes `key` from `store` if what it holds now still does not hash to its name: a
/// correct upload that replaced the bad copy while it was being read must survive.
async fn remove_if_still_corrupt(store: Arc<dyn BlobStore>, key: Key) {
    let Some(function) = key.function() else {
        return;
    };
    let expected = *key.hash();
    let still_bad = match store.open(&key, 0, None).await {
        Ok(Some((_, mut r))) => {
            let mut hasher = function.hasher();
            let mut buf = vec![0u8; SKIP_CHUNK];
            loop {
                match tokio::io::AsyncReadExt::read(&mut r, &mut buf).await {
                    Ok(0) => break hasher.finalize() != expected,
                    Ok(n) => hasher.update(&buf[..n]),
                    // Unreadable now: leave it for the next read to judge.
                    Err(_) => break false,
                }
            }
        }
        _ => false,
    };
    if still_bad {
        if let Err(e) = store.remove(&key).await {
            tracing::warn!(key = %key, error = %e, "could not remove a corrupt blob");
        }
    }
}

fn log_corrupt(key: &Key, actual: &[u8; 32]) {
    tracing::error!(key = %key, actual = %hex::encode(actual), "a stored blob does not match its digest; removing it");
}

/// `key` from `store`, a CAS blob hashed as it streams (its skipped prefix too). Shared by
/// this layer and the fast-slow layer's reads that bypass the fast tier.
pub(crate) async fn open_verified(
    store: &Arc<dyn BlobStore>,
    key: &Key,
    offset: u64,
    limit: Option<u64>,
) -> Result<Option<(u64, BlobReader)>> {
    let Some(function) = key.function() else {
        return store.open(key, offset, limit).await;
    };
    let Some((size, inner)) = store.open(key, 0, None).await? else {
        return Ok(None);
    };
    let skip = offset.min(size);
    let end = limit.map_or(size, |l| skip.saturating_add(l).min(size));
    let reader = Verifying {
        inner,
        hasher: function.hasher(),
        key: *key,
        size,
        seen: 0,
        skip,
        end,
        held: None,
        tail: Vec::new(),
        scratch: Vec::new(),
        store: store.clone(),
        done: None,
    };
    Ok(Some((size, Box::pin(reader))))
}

#[async_trait]
impl BlobStore for VerifyStore {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        self.inner.lookup(keys).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let Some(data) = self.inner.get(key).await? else {
            return Ok(None);
        };
        if let Some(function) = key.function() {
            let actual = function.hash(&data);
            if &actual != key.hash() {
                log_corrupt(key, &actual);
                remove_if_still_corrupt(self.inner.clone(), *key).await;
                return Ok(None);
            }
        }
        Ok(Some(data))
    }

    async fn open(
        &self,
        key: &Key,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<(u64, BlobReader)>> {
        open_verified(&self.inner, key, offset, limit).await
    }

    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        self.inner.writer(size_hint).await
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        self.inner.remove(key).await
    }

    async fn list(&self, kind: KeyKind) -> Result<Vec<Key>> {
        self.inner.list(kind).await
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
}

/// Hashes everything read, drops the first `skip` bytes, and checks the hash on the read
/// that brings the count to the blob's `size`: consumers stop there (a `take(size)`, an
/// HTTP body of that length) and never ask for the EOF after it. On a mismatch that last
/// chunk is withheld and the read fails, so no consumer ever holds the whole bad blob; the
/// copy is removed from `store`. The outcome is final: later polls repeat it.
///
/// A range that ends before the blob does (`end < size`) is read through `scratch`: its
/// last chunk is held back (`held`) while the rest of the blob is read and hashed, and
/// served only once the verdict is in. A consumer that stops at `end` has then never been
/// handed the end of its range from a blob that does not match.
struct Verifying {
    inner: BlobReader,
    hasher: Hasher,
    /// The content-addressed key read: its hash is the one expected.
    key: Key,
    size: u64,
    /// Bytes read from `inner`, skipped ones included.
    seen: u64,
    skip: u64,
    /// Where the consumer's range ends (at most `size`).
    end: u64,
    /// The range's last part, read and waiting for the verdict; then served from.
    held: Option<(Vec<u8>, usize)>,
    /// The range's last part while it is being read.
    tail: Vec<u8>,
    scratch: Vec<u8>,
    store: Arc<dyn BlobStore>,
    done: Option<Result<(), String>>,
}

impl Verifying {
    fn failed(&mut self, message: String) -> std::io::Error {
        self.done = Some(Err(message.clone()));
        Error::Corrupt(message).into_io()
    }

    /// Called once `seen == size`: the verdict.
    fn finish(&mut self) -> Result<(), std::io::Error> {
        let function = self.key.function().unwrap_or_default();
        let actual = std::mem::replace(&mut self.hasher, function.hasher()).finalize();
        if &actual == self.key.hash() {
            self.done = Some(Ok(()));
            return Ok(());
        }
        let key = self.key;
        log_corrupt(&key, &actual);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(remove_if_still_corrupt(self.store.clone(), key))),
            Err(_) => tracing::warn!(key = %key, "no runtime to remove a corrupt blob on"),
        }
        Err(self.failed(format!(
            "the stored copy of {key} hashes to {}: not served",
            hex::encode(actual)
        )))
    }

    /// Reads up to `want` more bytes of the blob into `scratch`, hashing them. A clean
    /// end before `size` is an error.
    fn poll_scratch(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        if self.scratch.len() < SKIP_CHUNK {
            self.scratch = vec![0u8; SKIP_CHUNK];
        }
        let want = want.min(self.scratch.len());
        let mut sb = ReadBuf::new(&mut self.scratch[..want]);
        std::task::ready!(self.inner.as_mut().poll_read(cx, &mut sb))?;
        let n = sb.filled().len();
        if n == 0 && want > 0 {
            let m = format!(
                "the stored copy of {} ended after {} of its {} bytes",
                self.key, self.seen, self.size
            );
            return Poll::Ready(Err(self.failed(m)));
        }
        self.hasher.update(&self.scratch[..n]);
        self.took(n)?;
        Poll::Ready(Ok(n))
    }

    /// A range ending before the blob (see the type's comment).
    fn poll_range(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if let Some((held, pos)) = &mut self.held {
                if self.done.is_none() {
                    // Held while the rest of the blob is read for the verdict.
                    while self.seen < self.size {
                        let left = (self.size - self.seen).min(SKIP_CHUNK as u64) as usize;
                        std::task::ready!(self.poll_scratch(cx, left))?;
                    }
                    self.finish()?;
                    continue;
                }
                let n = (held.len() - *pos).min(buf.remaining());
                buf.put_slice(&held[*pos..*pos + n]);
                *pos += n;
                return Poll::Ready(Ok(()));
            }
            let left = self.end - self.seen;
            let room = buf.remaining() as u64;
            if left == 0 {
                // The range's last part is read (or the range is empty): hold it.
                self.held = Some((std::mem::take(&mut self.tail), 0));
                continue;
            }
            if !self.tail.is_empty() || left <= room || left <= SKIP_CHUNK as u64 {
                // The range's last part: collected whole, whatever the consumer's buffer.
                let want = left.min(SKIP_CHUNK as u64) as usize;
                let n = std::task::ready!(self.poll_scratch(cx, want))?;
                self.tail.extend_from_slice(&self.scratch[..n]);
                continue;
            }
            // Well before the end of the range: pass on, keeping the last part back.
            let want = (left - SKIP_CHUNK as u64).min(room).min(SKIP_CHUNK as u64) as usize;
            let n = std::task::ready!(self.poll_scratch(cx, want))?;
            buf.put_slice(&self.scratch[..n]);
            return Poll::Ready(Ok(()));
        }
    }

    fn took(&mut self, n: usize) -> Result<(), std::io::Error> {
        self.seen += n as u64;
        if self.seen > self.size {
            let m = format!(
                "the stored copy of {} is longer than its {} bytes",
                self.key, self.size
            );
            return Err(self.failed(m));
        }
        Ok(())
    }
}

impl AsyncRead for Verifying {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match &this.done {
            Some(Err(m)) => return Poll::Ready(Err(Error::Corrupt(m.clone()).into_io())),
            // A held range's last part is served after the verdict.
            _ if this.held.is_some() => return this.poll_range(cx, buf),
            Some(Ok(())) => return Poll::Ready(Ok(())), // EOF, as before
            None => {}
        }
        while this.skip > 0 {
            if this.scratch.is_empty() {
                this.scratch = vec![0u8; SKIP_CHUNK];
            }
            let want = this.scratch.len().min(this.skip as usize);
            let mut sb = ReadBuf::new(&mut this.scratch[..want]);
            std::task::ready!(this.inner.as_mut().poll_read(cx, &mut sb))?;
            let n = sb.filled().len();
            if n == 0 {
                let m = format!(
                    "the stored copy of {} ended before the read offset",
                    this.key
                );
                return Poll::Ready(Err(this.failed(m)));
            }
            this.hasher.update(&this.scratch[..n]);
            this.skip -= n as u64;
            this.took(n)?;
            if this.skip == 0 {
                this.scratch = Vec::new();
            }
        }
        if this.seen == this.size {
            // Nothing left to serve (a read from the end, or an empty blob): decide now.
            this.finish()?;
            return Poll::Ready(Ok(()));
        }
        if this.end < this.size {
            return this.poll_range(cx, buf);
        }
        let room = buf.remaining() > 0;
        let before = buf.filled().len();
        std::task::ready!(this.inner.as_mut().poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n == 0 && room {
            let m = format!(
                "the stored copy of {} ended after {} of its {} bytes",
                this.key, this.seen, this.size
            );
            return Poll::Ready(Err(this.failed(m)));
        }
        this.hasher.update(&buf.filled()[before..]);
        if let Err(e) = this.took(n) {
            buf.set_filled(before);
            return Poll::Ready(Err(e));
        }
        if this.seen == this.size {
            if let Err(e) = this.finish() {
                buf.set_filled(before); // the bad blob's last bytes are never handed out
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::StoreMetrics;
    use crate::store::MemStore;
    use sha2::{Digest as _, Sha256};
    use tokio::io::AsyncReadExt;

    async fn raw_put(store: &dyn BlobStore, key: Key, data: &[u8]) {
        let mut w = store.writer(Some(data.len() as u64)).await.unwrap();
        w.write(data).await.unwrap();
        w.commit(key).await.unwrap();
    }

    async fn read(store: &dyn BlobStore, key: &Key, offset: u64) -> std::io::Result<Vec<u8>> {
        let (_, mut r) = store
            .open(key, offset, None)
            .await
            .unwrap()
            .expect("present");
        let mut v = Vec::new();
        r.read_to_end(&mut v).await.map(|_| v)
    }

    async fn gone(store: &dyn BlobStore, key: &Key) -> bool {
        for _ in 0..100 {
            if store.lookup(std::slice::from_ref(key)).await.unwrap()[0].is_none() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    /// A BLAKE3 key is judged by BLAKE3: its intact bytes are served, and bytes whose
    /// SHA-256 (not BLAKE3) is the name are corrupt there.
    #[tokio::test]
    async fn a_blake3_blob_is_judged_by_blake3() {
        let mem: Arc<dyn BlobStore> = Arc::new(MemStore::new(1 << 30, StoreMetrics::default()));
        let store = VerifyStore::new(mem.clone());
        let data = vec![3u8; 300_000];
        let good = Key::Blake3Cas(*blake3::hash(&data).as_bytes());
        raw_put(mem.as_ref(), good, &data).await;
        assert_eq!(read(&store, &good, 0).await.unwrap(), data);
        assert_eq!(
            read(&store, &good, 299_000).await.unwrap(),
            &data[299_000..]
        );
        assert_eq!(&store.get(&good).await.unwrap().unwrap()[..], &data[..]);
        let wrong = Key::Blake3Cas(Sha256::digest(&data).into());
        raw_put(mem.as_ref(), wrong, &data).await;
        assert!(read(&store, &wrong, 0).await.is_err());
        assert!(gone(mem.as_ref(), &wrong).await);
        raw_put(mem.as_ref(), wrong, &data).await;
        assert!(store.get(&wrong).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn intact_blobs_are_served_and_corrupt_ones_never_whole() {
        let mem: Arc<dyn BlobStore> = Arc::new(MemStore::new(1 << 30, StoreMetrics::default()));
        let store = VerifyStore::new(mem.clone());
        let good_data = vec![7u8; 200_000];
        let good = Key::Cas(Sha256::digest(&good_data).into());
        raw_put(mem.as_ref(), good, &good_data).await;
        assert_eq!(read(&store, &good, 0).await.unwrap(), good_data);
        assert_eq!(
            read(&store, &good, 150_000).await.unwrap(),
            &good_data[150_000..],
            "a read from an offset hashes the skipped prefix and serves the rest"
        );
        assert_eq!(
            &store.get(&good).await.unwrap().unwrap()[..],
            &good_data[..]
        );

        // Bytes stored under another blob's name (a tampered bucket, bit rot).
        let claimed = Key::Cas(Sha256::digest(b"what the name says").into());
        raw_put(mem.as_ref(), claimed, b"something else entirely").await;
        let e = read(&store, &claimed, 0).await.unwrap_err();
        assert!(e.to_string().contains("not served"), "{e}");
        assert!(
            gone(mem.as_ref(), &claimed).await,
            "removed from the store below"
        );

        raw_put(mem.as_ref(), claimed, b"something else entirely").await;
        assert!(store.get(&claimed).await.unwrap().is_none(), "get: a miss");
        assert!(gone(mem.as_ref(), &claimed).await);

        // Truncated: fewer bytes than the name's content, also caught.
        raw_put(mem.as_ref(), claimed, b"what the name").await;
        assert!(read(&store, &claimed, 0).await.is_err());

        // Same-size damage read the way the server reads (`take(size)`, a body of that
        // length): the consumer never asks for EOF, and still gets an error, never the
        // whole blob; reading again after the verdict repeats it, and a clean EOF stays one.
        raw_put(mem.as_ref(), good, &good_data).await;
        let mut rotten = good_data.clone();
        rotten[199_999] ^= 1;
        let other = Key::Cas(Sha256::digest(&good_data[..100]).into());
        raw_put(mem.as_ref(), other, &rotten[..100]).await; // intact, for the clean-EOF check
        let damaged = Key::Cas(Sha256::digest(b"damaged in place").into());
        raw_put(mem.as_ref(), damaged, b"damaged in plaCe").await;
        let (size, r) = store.open(&damaged, 0, None).await.unwrap().unwrap();
        let mut r = r.take(size);
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).await.unwrap_err();
        assert!(e.to_string().contains("not served"), "{e}");
        assert!(
            got.len() < size as usize,
            "the last chunk is withheld: {} bytes",
            got.len()
        );
        let mut inner = r.into_inner();
        let mut more = [0u8; 8];
        assert!(inner.read(&mut more).await.is_err(), "the verdict is final");
        assert!(gone(mem.as_ref(), &damaged).await);

        let (size, mut r) = store.open(&other, 0, None).await.unwrap().unwrap();
        let mut got = vec![0u8; size as usize];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(got, &good_data[..100]);
        assert_eq!(r.read(&mut more).await.unwrap(), 0);
        assert_eq!(
            r.read(&mut more).await.unwrap(),
            0,
            "EOF stays EOF, no second verdict"
        );
        assert!(
            mem.lookup(&[other]).await.unwrap()[0].is_some(),
            "a good blob is never removed"
        );

        // A read starting at the very end hashes everything while skipping: still judged.
        raw_put(mem.as_ref(), damaged, b"damaged in plaCe").await;
        let (_, mut r) = store.open(&damaged, 16, None).await.unwrap().unwrap();
        assert!(r.read(&mut more).await.is_err());

        // Action results are not content-addressed: passed through as stored.
        let ac = Key::ac("", crate::digest::DigestFunction::Sha256, &[1; 32]);
        raw_put(mem.as_ref(), ac, b"any bytes").await;
        assert_eq!(read(&store, &ac, 4).await.unwrap(), b"bytes");
    }

    /// Reads `limit` bytes from `offset` the way ByteStream does with a `read_limit`: the
    /// consumer takes exactly that many and drops the reader, never reading to the end.
    async fn read_range(
        store: &dyn BlobStore,
        key: &Key,
        offset: u64,
        limit: u64,
        chunk: usize,
    ) -> std::io::Result<Vec<u8>> {
        let (_, r) = store
            .open(key, offset, Some(limit))
            .await
            .unwrap()
            .expect("present");
        let mut r = r.take(limit);
        let mut got = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok(got);
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn a_read_that_stops_short_of_the_end_still_gets_the_verdict() {
        let mem: Arc<dyn BlobStore> = Arc::new(MemStore::new(1 << 30, StoreMetrics::default()));
        let store = VerifyStore::new(mem.clone());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let key = Key::Cas(Sha256::digest(&data).into());
        raw_put(mem.as_ref(), key, &data).await;
        // Intact: every range is served exactly, with small and large consumer buffers.
        for (offset, limit) in [(0, 10), (0, 200_000), (1000, 70_000), (299_990, 10), (5, 0)] {
            for chunk in [7, 4096, 1 << 20] {
                let got = read_range(&store, &key, offset, limit, chunk)
                    .await
                    .unwrap();
                assert_eq!(
                    got,
                    &data[offset as usize..(offset + limit) as usize],
                    "offset {offset} limit {limit} chunk {chunk}"
                );
            }
        }
        // Damaged past the range: the range itself reads fine from the bytes, but the
        // blob is not what its name says, so its end is never handed out.
        let mut bad = data.clone();
        bad[290_000] ^= 1;
        for (offset, limit) in [(0, 100), (0, 200_000), (1000, 70_000), (299_000, 999)] {
            for chunk in [7, 1 << 20] {
                raw_put(mem.as_ref(), key, &bad).await;
                let r = read_range(&store, &key, offset, limit, chunk).await;
                match r {
                    Err(e) => assert!(e.to_string().contains("not served"), "{e}"),
                    Ok(got) => panic!(
                        "offset {offset} limit {limit} chunk {chunk}: served {} bytes with OK",
                        got.len()
                    ),
                }
                assert!(gone(mem.as_ref(), &key).await, "the bad copy is removed");
            }
        }
    }
}
