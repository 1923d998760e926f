//! `PUT nar/<FileHash>.nar[.xz|.zst]`: a NAR arrives as Nix compressed it. It is
//! decompressed as it streams, parsed by the strict NAR parser (a traversing, unsorted or
//! oversized NAR is refused before it ends), and stored in the CAS under its NarHash, so
//! a NAR pushed here and one pushed over REAPI are the same blob. The compressed bytes
//! must hash to the name's FileHash: a truncated or altered upload stores nothing.
//!
//! Bounds: the decompressed NAR at most the instance's `max_nar_size` (a decompression
//! bomb stops there), its compressed form at most that plus 1 MiB, an xz decoder's
//! memory at most `XZ_MEMORY`, a zstd window at most 32 MiB, and at most `DECODERS`
//! decoders at once (a wait for one gives up after 30 s with a 503).

use std::pin::Pin;

use axum::body::Body;
use bytes::Bytes;
use futures::TryStreamExt;
use lre_nix_formats::nar::{NarParser, Validate};
use lre_nix_formats::NixHash;
use lre_store::store::CasUpload;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio_util::io::{InspectReader, StreamReader};

use super::path::Compression;
use crate::context::ServerContext;
use crate::digest::DigestFunction;
use crate::error::{Error, Result};

/// xz's `-9` needs a 64 MiB dictionary; nothing Nix writes needs more.
const XZ_MEMORY: u64 = 80 << 20;
/// Decoders hold that much each: a bound on how many run at once.
const DECODERS: usize = 4;
static DECODER_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DECODERS);
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// zstd's window: 32 MiB (levels up to 19 use at most 8 MiB; the default would allow 128).
const ZSTD_WINDOW_LOG: u32 = 25;

/// Stores the NAR the body carries; returns its NarHash and size.
pub async fn put(
    cache: &ServerContext,
    name: &str,
    file_hash: NixHash,
    compression: Compression,
    max_nar_size: u64,
    body: Body,
) -> Result<(NixHash, u64)> {
    // A slot is held while the body arrives; a client trickling one must not keep others
    // waiting forever, so waiting for one is bounded too.
    let _slot = match compression {
        Compression::None => None,
        _ => Some(
            tokio::time::timeout(SLOT_WAIT, DECODER_SLOTS.acquire())
                .await
                .map_err(|_| {
                    Error::ResourceExhausted(format!(
                        "{DECODERS} compressed NAR uploads are being decoded; retry, or copy \
                         with ?compression=none"
                    ))
                })?
                .map_err(|_| Error::Internal("decoder slots closed".into()))?,
        ),
    };
    let mut file_hasher = Sha256::new();
    let body = StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let compressed = InspectReader::new(body, |b| file_hasher.update(b))
        .take(max_nar_size.saturating_add(1 << 20));
    let mut decoded: Pin<Box<dyn AsyncRead + Send + '_>> = match compression {
        Compression::None => Box::pin(compressed),
        Compression::Xz => Box::pin(
            async_compression::tokio::bufread::XzDecoder::with_mem_limit(
                BufReader::new(compressed),
                XZ_MEMORY,
            ),
        ),
        Compression::Zstd => Box::pin(async_compression::tokio::bufread::ZstdDecoder::with_params(
            BufReader::new(compressed),
            &[async_compression::zstd::DParameter::window_log_max(
                ZSTD_WINDOW_LOG,
            )],
        )),
    };
    let mut parser = NarParser::new(max_nar_size);
    let mut upload =
        CasUpload::of_content(cache.store.as_ref(), DigestFunction::Sha256, None).await?;
    let refused =
        |why: String| Error::InvalidArgument(format!("nar/{name}: {why}; nothing was stored"));
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match decoded.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                upload.discard().await;
                return Err(refused(format!(
                    "the upload could not be read or decompressed: {e}"
                )));
            }
        };
        if let Err(e) = parser.feed(&buf[..n], &mut Validate) {
            upload.discard().await;
            return Err(refused(e.to_string()));
        }
        if let Err(e) = upload.write_bytes(Bytes::copy_from_slice(&buf[..n])).await {
            upload.discard().await;
            return Err(e.into());
        }
        cache.metrics.bytes_received.inc_by(n as u64);
    }
    drop(decoded);
    let summary = match parser.finish() {
        Ok(s) => s,
        Err(e) => {
            upload.discard().await;
            return Err(refused(e.to_string()));
        }
    };
    let actual = NixHash(file_hasher.finalize().into());
    if actual != file_hash {
        upload.discard().await;
        return Err(refused(format!(
            "the uploaded file hashes to {actual}, its name says {file_hash} (truncated or altered in transit?)"
        )));
    }
    let digest = upload.finish().await?;
    debug_assert_eq!(digest.hash, summary.nar_hash.0);
    Ok((summary.nar_hash, summary.nar_size))
}
