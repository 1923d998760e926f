//! `lre provenance list|purge --writer token:NAME`: which action results one token or one
//! worker wrote on a server, and removing them (a leaked token's), through the server's
//! admin API (`/api/provenance`, an `admin` token).

use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use crate::status::{api_client, read_token, ServerArgs};

#[derive(clap::Args)]
pub struct ProvenanceArgs {
    /// `token:NAME` (results uploaded with that token, or run by its workers) or
    /// `worker:TOKEN/ID` (results one worker ran).
    #[arg(long)]
    writer: String,
    /// Only this instance's results.
    #[arg(long)]
    instance: Option<String>,
    /// The server, and a token of scope "admin".
    #[command(flatten)]
    api: ServerArgs,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
    /// Entries listed in text form.
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

pub async fn provenance(args: ProvenanceArgs, purge: bool) -> anyhow::Result<ExitCode> {
    let http = api_client(args.api.tls_ca.as_deref())?;
    let token = read_token(args.api.token_file.as_deref())?;
    let base = args.api.server.trim_end_matches('/');
    let mut query = vec![("writer", args.writer.clone())];
    if let Some(i) = &args.instance {
        query.push(("instance", i.clone()));
    }
    let path = if purge {
        "/api/provenance/purge"
    } else {
        "/api/provenance"
    };
    let url = reqwest::Url::parse_with_params(&format!("{base}{path}"), &query)
        .with_context(|| format!("{base} is not a URL"))?;
    let mut req = if purge {
        http.post(url.clone())
    } else {
        http.get(url.clone())
    };
    if let Some(t) = &token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let code = resp.status();
    let body = resp
        .text()
        .await
        .with_context(|| format!("reading {url}"))?;
    if !code.is_success() {
        anyhow::bail!("{path}: {code}: {}", body.trim());
    }
    let v: Value =
        serde_json::from_str(&body).with_context(|| format!("{url} did not answer with JSON"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let count = v["count"].as_u64().unwrap_or(0);
    match v["purged"].as_u64() {
        Some(n) => println!(
            "lre provenance: purged {n} action result(s) written by {} ({} entries scanned)",
            args.writer, v["scanned"]
        ),
        None => println!(
            "lre provenance: {count} action result(s) written by {} ({} entries scanned)",
            args.writer, v["scanned"]
        ),
    }
    for e in v["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .take(args.limit)
    {
        let text = |k: &str| {
            e[k].as_str()
                .unwrap_or("")
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect::<String>()
        };
        println!(
            "  {}  instance {:?}  action {}  {} by {}{}",
            e["written_at_ms"],
            text("instance"),
            text("action"),
            text("source"),
            if text("worker").is_empty() {
                format!("token {}", text("token"))
            } else {
                format!("worker {} (token {})", text("worker"), text("token"))
            },
            if text("operation").is_empty() {
                String::new()
            } else {
                format!(", operation {}", text("operation"))
            }
        );
    }
    if count as usize > args.limit {
        println!(
            "  … and {} more (--limit, --json)",
            count as usize - args.limit
        );
    }
    Ok(ExitCode::SUCCESS)
}
