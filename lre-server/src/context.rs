//! The server's shared context: the stores (CAS, and action results behind the
//! completeness rule), who may do what (instances, auth), metrics and the status history.
//! gRPC services and HTTP handlers call its methods, so a blob written over one protocol is
//! readable over the other and the rules are enforced once.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use bytes::Bytes;
use prost::Message;
use tokio::io::AsyncReadExt as _;

use crate::auth::{Access, Authenticator, Credential, Principal};
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::instance::Instances;
use crate::metrics::Metrics;
use crate::store::{BlobReader, BlobStore, CasUpload, CompletenessChecking, Key};
pub use lre_store::ac_entry::Provenance;
use lre_store::ac_entry::{AcEntry, SOURCE_EXECUTED, SOURCE_UPLOADED};

pub struct ServerContext {
    /// The CAS.
    pub store: Arc<dyn BlobStore>,
    /// Action results, read through the completeness rule; under it, unchecked, the
    /// Remote Asset API's remembered fetches. `[action_cache_store]`, or `store`.
    pub action_results: Arc<CompletenessChecking>,
    pub metrics: Arc<Metrics>,
    pub instances: Instances,
    pub auth: Authenticator,
    pub max_batch_total_size_bytes: u64,
    /// What the status page shows: recent actions, invocations, the last hour.
    pub activity: crate::activity::Activity,
}

/// An action-cache hit: the decoded result, its exact encoding as served, and who wrote
/// it (`None` for an entry written before lre recorded that).
pub struct AcHit {
    pub result: ActionResult,
    pub raw: Bytes,
    pub provenance: Option<Provenance>,
}

/// Who is writing an action result, for its provenance.
pub enum ResultSource<'a> {
    /// lre's scheduler, storing what `worker` (attached with `token`) ran.
    Executed {
        worker: &'a str,
        token: &'a str,
        operation: &'a str,
    },
    /// A client: UpdateActionResult or an HTTP PUT.
    Uploaded { caller: &'a Principal },
}

/// The action-cache store `results` behind the completeness rule, over `cas`, counting
/// what it withholds in `metrics`.
pub fn checked_results(
    results: Arc<dyn BlobStore>,
    cas: Arc<dyn BlobStore>,
    metrics: Arc<Metrics>,
) -> Arc<CompletenessChecking> {
    Arc::new(CompletenessChecking::new(
        results,
        cas,
        Box::new(move |why| {
            if why == lre_store::store::completeness::Withheld::Incomplete {
                metrics.ac("incomplete")
            }
        }),
    ))
}

impl ServerContext {
    /// Checks the instance name, authenticates the caller and authorizes the access.
    ///
    /// An instance this server does not serve is named as unknown only to a caller who
    /// could use it if it existed; any other caller is refused exactly as for an instance
    /// that exists, so instance names cannot be probed for without a token.
    pub fn authorize(
        &self,
        cred: Option<Credential>,
        instance: &str,
        access: Access,
    ) -> Result<Principal> {
        crate::instance::validate_name(instance)?;
        let p = self.auth.authenticate(cred)?;
        self.auth.authorize(&p, instance, access)?;
        self.instances.check(instance)?;
        if access == Access::Write && self.instances.executed_only(instance) {
            return Err(Error::PermissionDenied(
                crate::instance::executed_only_refusal(instance),
            ));
        }
        Ok(p)
    }

    /// Whether this caller may write action results to `instance` itself (Capabilities'
    /// `update_enabled`): its scope allows it and the instance is not executed-only.
    pub fn may_update_results(&self, p: &Principal, instance: &str) -> bool {
        p.may(instance, Access::Write) && !self.instances.executed_only(instance)
    }

    /// Authenticates a worker's Attach: not tied to one instance (the allow-list of
    /// `instances` does not apply), but to the worker scope.
    pub fn authorize_worker<T>(&self, req: &tonic::Request<T>) -> Result<Principal> {
        let p = self.auth.authenticate(crate::auth::grpc_credential(req)?)?;
        self.auth.authorize_work(&p)?;
        Ok(p)
    }

    pub fn authorize_grpc<T>(
        &self,
        req: &tonic::Request<T>,
        instance: &str,
        access: Access,
    ) -> Result<Principal> {
        self.authorize(crate::auth::grpc_credential(req)?, instance, access)
    }

    /// Which of `digests` the CAS lacks (a stored blob of another size counts as missing).
    /// Present blobs are refreshed in the LRU.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let wanted: Vec<Digest> = digests
            .iter()
            .filter(|d| !d.is_empty_blob())
            .copied()
            .collect();
        let keys: Vec<Key> = wanted.iter().map(Key::cas).collect();
        let sizes = self.store.lookup(&keys).await?;
        let missing: Vec<Digest> = wanted
            .iter()
            .zip(sizes)
            .filter(|(d, size)| *size != Some(d.size))
            .map(|(d, _)| *d)
            .collect();
        self.metrics
            .cas((wanted.len() - missing.len()) as u64, missing.len() as u64);
        Ok(missing)
    }

    pub async fn read_blob(&self, d: &Digest) -> Result<Option<Bytes>> {
        if d.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        // The stored size is compared before a byte is read: a digest claiming size 0 for
        // a 200 MB blob passes any check on claimed sizes (a batch's total, say), so it must
        // not make the server read, and hold, the real blob.
        let data = match self.store.open(&Key::cas(d), 0, None).await? {
            Some((size, reader)) if size == d.size => {
                let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 20));
                match reader.take(size).read_to_end(&mut buf).await {
                    Ok(_) => (buf.len() as u64 == size).then(|| Bytes::from(buf)),
                    Err(e) => match lre_store::StoreError::from(e) {
                        // A verify layer found the bytes do not match: the blob is gone, a
                        // miss the client repairs by uploading it again.
                        lre_store::StoreError::Corrupt(m) => {
                            tracing::warn!(digest = %d, error = %m, "corrupt blob read as a miss");
                            None
                        }
                        other => return Err(other.into()),
                    },
                }
            }
            _ => None,
        };
        self.metrics
            .cas(data.is_some() as u64, data.is_none() as u64);
        if let Some(b) = &data {
            self.metrics.bytes_sent.inc_by(b.len() as u64);
        }
        Ok(data)
    }

    /// Streams a CAS blob from `offset`, of which the caller reads at most `limit` bytes
    /// (`None`: to the end); the caller accounts for bytes sent.
    pub async fn open_blob(
        &self,
        d: &Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<BlobReader>> {
        if d.is_empty_blob() {
            return Ok(Some(Box::pin(tokio::io::empty())));
        }
        let found = match self.store.open(&Key::cas(d), offset, limit).await? {
            Some((size, reader)) if size == d.size => Some(reader),
            _ => None,
        };
        self.metrics
            .cas(found.is_some() as u64, found.is_none() as u64);
        Ok(found)
    }

    /// Streams a CAS blob known only by its hash (the HTTP protocol), with its size.
    pub async fn open_cas_by_hash(
        &self,
        function: DigestFunction,
        hash: [u8; 32],
    ) -> Result<Option<(u64, BlobReader)>> {
        if hash == function.empty_hash() {
            return Ok(Some((0, Box::pin(tokio::io::empty()))));
        }
        let key = Key::cas_by_hash(function, hash);
        let found = self.store.open(&key, 0, None).await?;
        self.metrics
            .cas(found.is_some() as u64, found.is_none() as u64);
        Ok(found)
    }

    /// Starts a verified streaming upload of a CAS blob: `hash` under `function`, of
    /// `size` bytes when known.
    pub async fn upload(
        &self,
        function: DigestFunction,
        hash: [u8; 32],
        size: Option<u64>,
    ) -> Result<CasUpload> {
        let key = Key::cas_by_hash(function, hash);
        Ok(CasUpload::for_key(self.store.as_ref(), key, size).await?)
    }

    pub async fn put_blob(&self, d: &Digest, data: Bytes) -> Result<()> {
        if d.is_empty_blob() && data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        let mut up = self.upload(d.function, d.hash, Some(d.size)).await?;
        if let Err(e) = up.write_bytes(data).await {
            up.discard().await;
            return Err(e.into());
        }
        up.finish().await?;
        self.metrics.bytes_received.inc_by(len);
        Ok(())
    }

    /// Returns an action result only if everything it references is in the CAS (the
    /// `CompletenessChecking` layer's rule), so a client that trusts the hit (Build without
    /// the Bytes) never meets an evicted blob.
    pub async fn get_action_result(
        &self,
        instance: &str,
        function: DigestFunction,
        action_hash: [u8; 32],
    ) -> Result<Option<AcHit>> {
        let key = Key::ac(instance, function, &action_hash);
        let Some(stored) = self.action_results.get(&key).await? else {
            self.metrics.ac("miss");
            return Ok(None);
        };
        let entry = AcEntry::decode(stored)?;
        // The key is derived under the function, so this holds; were it ever not to, a
        // result under another function must not answer.
        if entry.function != function {
            tracing::warn!(%key, stored = %entry.function, asked = %function, "an action result under another digest function: a miss");
            self.metrics.ac("miss");
            return Ok(None);
        }
        let result = ActionResult::decode(entry.result.clone()).map_err(|e| {
            Error::Internal(format!(
                "the completeness layer passed an undecodable result: {e}"
            ))
        })?;
        self.metrics.ac("hit");
        Ok(Some(AcHit {
            result,
            raw: entry.result,
            provenance: entry.provenance,
        }))
    }

    /// Stores `result` for the action, with who wrote it. Whether a client may write at all
    /// (its scope, an executed-only instance) is `authorize`'s to decide before this.
    pub async fn update_action_result(
        &self,
        instance: &str,
        function: DigestFunction,
        action_hash: [u8; 32],
        result: &ActionResult,
        source: ResultSource<'_>,
    ) -> Result<()> {
        validate_action_result(function, result)?;
        let written_at_ms = crate::activity::unix_ms(std::time::SystemTime::now());
        let provenance = match source {
            ResultSource::Executed {
                worker,
                token,
                operation,
            } => Provenance {
                instance: instance.into(),
                action: hex::encode(action_hash),
                written_at_ms,
                source: SOURCE_EXECUTED.into(),
                worker: worker.into(),
                token: token.into(),
                operation: operation.into(),
            },
            ResultSource::Uploaded { caller } => Provenance {
                instance: instance.into(),
                action: hex::encode(action_hash),
                written_at_ms,
                source: SOURCE_UPLOADED.into(),
                worker: String::new(),
                token: caller.name.clone().unwrap_or_default(),
                operation: String::new(),
            },
        };
        let raw = self
            .action_results
            .entry_for(function, result, provenance)
            .await?;
        let mut w = self.action_results.writer(Some(raw.len() as u64)).await?;
        if let Err(e) = w.write(&raw).await {
            w.discard().await;
            return Err(e.into());
        }
        w.commit(Key::ac(instance, function, &action_hash)).await?;
        self.metrics.bytes_received.inc_by(raw.len() as u64);
        Ok(())
    }
}

/// Rejects results whose digests are malformed, so a bad entry never gets stored.
fn validate_action_result(function: DigestFunction, r: &ActionResult) -> Result<()> {
    for f in &r.output_files {
        if f.digest.is_none() {
            return Err(Error::InvalidArgument(format!(
                "output file {:?} has no digest",
                f.path
            )));
        }
        Digest::from_opt_proto(function, &f.digest)?;
    }
    for d in &r.output_directories {
        if d.tree_digest.is_none() {
            return Err(Error::InvalidArgument(format!(
                "output directory {:?} has no tree digest",
                d.path
            )));
        }
        Digest::from_opt_proto(function, &d.tree_digest)?;
    }
    Digest::from_opt_proto(function, &r.stdout_digest)?;
    Digest::from_opt_proto(function, &r.stderr_digest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use lre_test_support::Counting;

    #[tokio::test]
    async fn a_digest_that_understates_the_size_reads_nothing() {
        let metrics = Arc::new(Metrics::new());
        let store = Counting::new(MemStore::new(1 << 30, metrics.store.clone()));
        let served = store.served.clone();
        let store: Arc<dyn BlobStore> = Arc::new(store);
        let cache = ServerContext {
            action_results: checked_results(store.clone(), store.clone(), metrics.clone()),
            store,
            metrics,
            instances: Instances::new(None),
            auth: Authenticator::open(),
            max_batch_total_size_bytes: 4 << 20,
            activity: crate::activity::Activity::new(Default::default()),
        };
        let big = vec![7u8; 8 << 20];
        let real = Digest::of(&big);
        cache.put_blob(&real, big.clone().into()).await.unwrap();
        for size in [0, 1, real.size - 1, real.size + 1] {
            let lie = Digest { size, ..real };
            assert!(
                cache.read_blob(&lie).await.unwrap().is_none(),
                "size {size}"
            );
        }
        assert_eq!(
            served.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "no byte of the blob was read"
        );
        assert_eq!(
            cache.read_blob(&real).await.unwrap().unwrap().len(),
            big.len()
        );
        assert_eq!(served.load(std::sync::atomic::Ordering::Relaxed), real.size);
    }
}
