//! `lre explain A B`: which actions of two builds got different cache keys, and exactly why.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::execlog;
pub use lre_action_diff::{compare, differences, Report};

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// Execution log of the first build (JSON, binary or compact form).
    a: PathBuf,
    /// Execution log of the second build.
    b: PathBuf,
    /// Show at most this many differing actions in full.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Also say where B's cache hits came from: who wrote each result, asked of this
    /// server's HTTP address (http://HOST:8981).
    #[arg(long)]
    server: Option<String>,
    /// The instance B's build used (with --server).
    #[arg(long, default_value = "")]
    instance: String,
    /// A file holding a token that may read the instance (with --server; else LRE_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that an https server's certificate chains to.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

/// Hits asked about at most, a few at a time.
const MAX_HITS_ASKED: usize = 2000;

pub async fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let a = execlog::read(&args.a)?;
    let b = execlog::read(&args.b)?;
    let r = compare(&a, &b);
    println!(
        "lre explain: {} actions in A, {} in B, {} in both; {} with different keys",
        r.total_a,
        r.total_b,
        r.common,
        r.differing.len()
    );
    for (label, list) in [("only in A", &r.only_a), ("only in B", &r.only_b)] {
        if !list.is_empty() {
            println!(
                "{} actions {label}, e.g. {}",
                list.len(),
                list.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    for (spawn, diffs) in r.differing.iter().take(args.limit) {
        println!(
            "\n{} {} {}",
            spawn.target_label,
            spawn.mnemonic,
            spawn.identity()
        );
        for d in diffs {
            println!("  {d}");
        }
    }
    if r.differing.len() > args.limit {
        println!("\n… and {} more (--limit)", r.differing.len() - args.limit);
    }
    if !r.store_paths_a.is_empty() || !r.store_paths_b.is_empty() {
        println!("\nstore paths behind the differences:");
        for p in &r.store_paths_a {
            println!("  - {p}  (A only)");
        }
        for p in &r.store_paths_b {
            println!("  + {p}  (B only)");
        }
    }
    if let Some(server) = &args.server {
        where_hits_came_from(&args, server, &b).await?;
    }
    Ok(if r.differing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Prints who wrote the results B's cache hits got, asked of the server.
async fn where_hits_came_from(
    args: &ExplainArgs,
    server: &str,
    b: &[lre_action_diff::Spawn],
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let http = crate::status::api_client(args.tls_ca.as_deref())?;
    let token = crate::status::read_token(args.token_file.as_deref())?;
    let base = server.trim_end_matches('/');
    let hits: Vec<(&lre_action_diff::Spawn, String)> = b
        .iter()
        .filter(|s| s.cache_hit)
        .filter_map(|s| {
            let hash = s.digest.as_deref()?.split('/').next()?.to_string();
            Some((s, hash))
        })
        .take(MAX_HITS_ASKED)
        .collect();
    let answers: Vec<_> = futures::stream::iter(hits.iter())
        .map(|(spawn, hash)| {
            let (http, token) = (&http, token.as_deref());
            async move {
                let url = reqwest::Url::parse_with_params(
                    &format!("{base}/api/provenance/action"),
                    &[
                        ("instance", args.instance.as_str()),
                        ("action", hash.as_str()),
                    ],
                )?;
                let got = crate::status::get(http, url.as_str(), token).await?;
                Ok::<_, anyhow::Error>((*spawn, got))
            }
        })
        .buffered(8)
        .collect()
        .await;
    let mut by_writer: std::collections::BTreeMap<String, usize> = Default::default();
    let mut lines = Vec::new();
    for a in answers {
        let (spawn, got) = a?;
        let who = match got {
            Ok(v) if v.is_null() => {
                "unknown (the entry is gone, or older than provenance)".to_string()
            }
            Ok(v) => provenance_line(&v),
            Err(e) => anyhow::bail!("{base}/api/provenance/action: {e}"),
        };
        *by_writer.entry(who.clone()).or_default() += 1;
        lines.push(format!("  {} {}: {who}", spawn.mnemonic, spawn.identity()));
    }
    println!(
        "
where B's {} cache hits came from (asked of {base}):",
        lines.len()
    );
    for (who, n) in &by_writer {
        println!("  {n} written by {who}");
    }
    for l in lines.iter().take(args.limit) {
        println!("{l}");
    }
    Ok(())
}

/// "worker W (token T), executed at MS" from a provenance record; control characters
/// replaced, since another client wrote some of it.
fn provenance_line(v: &serde_json::Value) -> String {
    let t = |k: &str| -> String {
        v[k].as_str()
            .unwrap_or("")
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let who = if t("source") == "executed" {
        format!("worker {} (token {})", t("worker"), t("token"))
    } else if t("token").is_empty() {
        "an anonymous client's upload".into()
    } else {
        format!("token {}'s upload", t("token"))
    };
    format!("{who}, written at {} ms", v["written_at_ms"])
}
