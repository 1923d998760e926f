//! `lre status`: the server's status page in the terminal (or as JSON), from its API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

/// Where a server's HTTP API is and how to reach it: shared by the commands that use it.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// The server's HTTP address (where `/` shows the status page).
    #[arg(long, default_value = "http://127.0.0.1:8981", env = "LRE_STATUS_URL")]
    pub server: String,
    /// A file holding a token, sent as a bearer token (else LRE_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that an https server's certificate chains to.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    api: ServerArgs,
    /// Print the status and the miss explanation as one JSON document.
    #[arg(long)]
    json: bool,
    /// Explain this invocation's misses (default: the newest invocation with misses).
    #[arg(long)]
    new: Option<String>,
    /// ... against this invocation (default: the one of the same instance before it).
    #[arg(long)]
    base: Option<String>,
    /// Only consider invocations of this instance.
    #[arg(long)]
    instance: Option<String>,
    /// Recent actions and invocations shown in text form.
    #[arg(long, default_value_t = 10)]
    limit: usize,
}

/// The token in `token_file`, else `LRE_TOKEN`.
pub fn read_token(token_file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    if let Some(f) = token_file {
        let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok(Some(t.trim().to_string()));
    }
    // Taken from the environment, never from a flag: flags show up in `ps`.
    Ok(std::env::var("LRE_TOKEN").ok().filter(|t| !t.is_empty()))
}

pub async fn get(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<Result<Value, String>> {
    let mut req = http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let code = resp.status();
    let body = resp
        .text()
        .await
        .with_context(|| format!("reading {url}"))?;
    if code.is_success() {
        let v = serde_json::from_str(&body)
            .with_context(|| format!("{url} did not answer with JSON"))?;
        return Ok(Ok(v));
    }
    Ok(Err(format!("{code}: {}", body.trim())))
}

/// An HTTP client for the server's API, trusting `tls_ca` when given.
pub fn api_client(tls_ca: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
    if let Some(ca) = tls_ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        http = http.add_root_certificate(
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", ca.display()))?,
        );
    }
    Ok(http.build()?)
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let http = api_client(args.api.tls_ca.as_deref())?;
    let token = read_token(args.api.token_file.as_deref())?;
    let base = args.api.server.trim_end_matches('/');
    let status = match get(&http, &format!("{base}/api/status"), token.as_deref()).await? {
        Ok(v) => v,
        Err(e) => anyhow::bail!("{base}/api/status: {e}"),
    };
    let query: Vec<(&str, &String)> = [
        ("instance", &args.instance),
        ("base", &args.base),
        ("new", &args.new),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let url = reqwest::Url::parse_with_params(&format!("{base}/api/explain"), &query)
        .with_context(|| format!("{base} is not a URL"))?;
    let explanation = get(&http, url.as_str(), token.as_deref()).await?;
    if args.json {
        let doc = match &explanation {
            Ok(e) => serde_json::json!({ "status": status, "explanation": e }),
            Err(why) => serde_json::json!({
                "status": status, "explanation": null, "explanation_error": why,
            }),
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_status(base, &status, args.limit);
        match &explanation {
            Ok(e) => print_explanation(e),
            Err(why) => println!("\nno miss explanation: {why}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A value for the terminal. Other clients wrote most of these strings (ids, mnemonics,
/// messages): control characters are replaced, so none can drive the terminal.
fn s(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A number with its unit, or "-" when there is none.
fn unit(v: &Value, u: &str) -> String {
    if v.is_null() {
        "-".into()
    } else {
        format!("{}{u}", s(v))
    }
}

fn print_status(url: &str, v: &Value, limit: usize) {
    let st = &v["store"];
    println!(
        "lre-server {} at {url}, up {} s",
        s(&v["version"]),
        s(&v["uptime_seconds"])
    );
    println!(
        "store: {} bytes in {} entries; received {}, sent {} bytes; {} evictions",
        s(&st["size_bytes"]),
        s(&st["entries"]),
        s(&st["bytes_in"]),
        s(&st["bytes_out"]),
        s(&st["evictions"])
    );
    println!(
        "last hour: {} hits, {} misses, {} executed; hit rate {}",
        s(&v["hits"]),
        s(&v["misses"]),
        s(&v["executed"]),
        unit(&v["hit_rate_percent"], "%")
    );
    if let Some(e) = v.get("execution").filter(|e| !e.is_null()) {
        let workers = e["workers"].as_array().cloned().unwrap_or_default();
        let replicas = e["replicas"].as_u64().unwrap_or(1);
        match replicas {
            0 | 1 => println!("workers ({}):", workers.len()),
            n => println!(
                "workers ({}, on {n} replicas sharing the queue):",
                workers.len()
            ),
        }
        for w in &workers {
            println!("  {}", worker_line(w, replicas > 1));
        }
        println!(
            "queue: {} queued, {} executing, oldest waiting {}, {} no worker can run",
            s(&e["queued"]),
            s(&e["executing"]),
            unit(&e["oldest_queued_ms"], " ms"),
            s(&e["unmatchable"])
        );
    }
    let recent = v["recent"].as_array().cloned().unwrap_or_default();
    println!("recent actions ({} kept):", recent.len());
    for r in recent.iter().take(limit) {
        let what = [&r["mnemonic"], &r["target"], &r["first_output"]]
            .iter()
            .map(|x| s(x))
            .filter(|x| !x.is_empty() && x != "-")
            .collect::<Vec<_>>()
            .join(" ");
        let mut line = format!("  {:<9} {}", s(&r["outcome"]), what);
        if !r["worker"].is_null() {
            line += &format!(
                "  on {} in {} ms, exit {}",
                s(&r["worker"]),
                s(&r["duration_ms"]),
                s(&r["exit_code"])
            );
        }
        if let Some(w) = r.get("written_by").filter(|w| !w.is_null()) {
            line += &format!("  (result written by {})", s(&w["who"]));
        }
        if r["has_stderr"] == Value::Bool(true) {
            line += &format!("  (stderr: /api/actions/{}/stderr)", s(&r["id"]));
        }
        println!("{line}");
    }
    let invocations = v["invocations"].as_array().cloned().unwrap_or_default();
    println!("invocations ({}):", invocations.len());
    for i in invocations.iter().take(limit) {
        println!(
            "  {}  {}  instance {:?}: {} hits, {} misses, {} executed, {} failed",
            s(&i["id"]),
            s(&i["tool"]),
            s(&i["instance"]),
            s(&i["hits"]),
            s(&i["misses"]),
            s(&i["executed"]),
            s(&i["failed"])
        );
    }
}

/// One worker: its id, (with several replicas) the replica it is connected to, its slots,
/// when it was last heard from (known only on its own replica), and its platform.
fn worker_line(w: &Value, show_replica: bool) -> String {
    let props: Vec<String> = w["properties"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}={}", s(&p[0]), s(&p[1])))
        .collect();
    let mut line = s(&w["id"]);
    if show_replica {
        line.push_str(&format!("  on {}", s(&w["replica"])));
    }
    line.push_str(&format!(
        "  slots {}, running {}",
        s(&w["capacity"]),
        s(&w["running"])
    ));
    if !w["since_heard_ms"].is_null() {
        line.push_str(&format!(", heard {} ms ago", s(&w["since_heard_ms"])));
    }
    format!("{line}  {}", props.join(" "))
}

fn print_explanation(e: &Value) {
    println!(
        "\nwhy {} missed, against {}: {} missed action(s), {} with a counterpart, {} with different keys",
        s(&e["new"]["id"]),
        s(&e["base"]["id"]),
        s(&e["missed"]),
        s(&e["common"]),
        e["differing"].as_array().map_or(0, Vec::len)
    );
    if !e["stopped"].is_null() && e.get("stopped").is_some() {
        println!("  {}", s(&e["stopped"]));
    }
    for d in e["differing"].as_array().into_iter().flatten().take(20) {
        println!(
            "  {} {} {}",
            s(&d["target"]),
            s(&d["mnemonic"]),
            s(&d["output"])
        );
        for x in d["differences"].as_array().into_iter().flatten() {
            println!("    {}", s(x));
        }
    }
    for (sign, key) in [("-", "store_paths_base"), ("+", "store_paths_new")] {
        for p in e[key].as_array().into_iter().flatten() {
            println!("  {sign} {}", s(p));
        }
    }
    if e["inputs_not_compared"].as_u64().unwrap_or(0) > 0 {
        println!(
            "  inputs of {} action(s) not compared: {}",
            s(&e["inputs_not_compared"]),
            s(&e["inputs_not_compared_reason"])
        );
    }
    for u in e["unexplained"].as_array().into_iter().flatten() {
        println!(
            "  not compared: {} {}: {}",
            s(&u["target"]),
            s(&u["action"]),
            s(&u["reason"])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_s_workers_name_their_replica() {
        let here = serde_json::json!({"id": "w1", "replica": "host-1-ab", "capacity": 2,
            "running": 1, "since_heard_ms": 120, "properties": [["OSFamily", "Linux"]]});
        let there = serde_json::json!({"id": "w2", "replica": "host-2-cd", "capacity": 4,
            "running": 0, "since_heard_ms": null, "properties": []});
        assert_eq!(
            worker_line(&here, true),
            "w1  on host-1-ab  slots 2, running 1, heard 120 ms ago  OSFamily=Linux"
        );
        assert_eq!(
            worker_line(&there, true),
            "w2  on host-2-cd  slots 4, running 0  "
        );
        assert_eq!(
            worker_line(&here, false),
            "w1  slots 2, running 1, heard 120 ms ago  OSFamily=Linux"
        );
    }
}
