//! A real Garage cluster for tests, started by `e2e/garage/cluster.sh` (the one script the
//! e2e tests use too) and stopped when dropped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use lre_store::config::S3Config;
use object_store::aws::{AmazonS3, AmazonS3Builder};

pub struct Garage {
    dir: tempfile::TempDir,
    pub env: HashMap<String, String>,
}

fn script() -> PathBuf {
    crate::repo_root().join("e2e/garage/cluster.sh")
}

impl Garage {
    pub fn up(nodes: usize) -> Garage {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("bash")
            .arg(script())
            .arg("up")
            .arg(dir.path())
            .arg(nodes.to_string())
            .output()
            .expect("running cluster.sh");
        assert!(
            out.status.success(),
            "cluster.sh up failed (is garage installed? `cargo install garage --locked`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("env")).expect("cluster env");
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        Garage { dir, env }
    }

    fn run(&self, cmd: &str, nodes: &[usize]) {
        let st = Command::new("bash")
            .arg(script())
            .arg(cmd)
            .arg(self.dir.path())
            .args(nodes.iter().map(|n| n.to_string()))
            .status()
            .expect("running cluster.sh");
        assert!(st.success(), "cluster.sh {cmd} {nodes:?} failed");
    }

    /// SIGKILL, as a crashed machine.
    pub fn stop_node(&self, node: usize) {
        self.run("stop-node", &[node])
    }

    /// Starts the nodes again and waits until the whole cluster is healthy.
    pub fn start_nodes(&self, nodes: &[usize]) {
        self.run("start-node", nodes)
    }

    pub fn endpoint(&self, node: usize) -> String {
        self.env["GARAGE_ENDPOINTS"]
            .split(' ')
            .nth(node - 1)
            .expect("node")
            .to_owned()
    }

    /// The store's config for node `node`'s S3 API.
    pub fn config(&self, node: usize) -> S3Config {
        let mut c = S3Config::new(Some(self.endpoint(node)), &self.env["GARAGE_BUCKET"]);
        c.region = self.env["GARAGE_REGION"].clone();
        c.allow_http = true;
        c.access_key_id = Some(self.env["GARAGE_KEY_ID"].clone());
        c.secret_access_key_file = Some(PathBuf::from(&self.env["GARAGE_SECRET_FILE"]));
        c.request_timeout_seconds = 10;
        c
    }

    /// `object_store` itself, for looking behind the store's back.
    pub fn raw(&self, node: usize) -> Arc<AmazonS3> {
        let secret = std::fs::read_to_string(&self.env["GARAGE_SECRET_FILE"]).expect("secret");
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(self.endpoint(node))
                .with_bucket_name(&self.env["GARAGE_BUCKET"])
                .with_region(&self.env["GARAGE_REGION"])
                .with_allow_http(true)
                .with_access_key_id(&self.env["GARAGE_KEY_ID"])
                .with_secret_access_key(secret.trim())
                .build()
                .expect("raw client"),
        )
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The nodes' logs say why a request failed; show their ends.
            for i in 1..=3 {
                if let Ok(log) = std::fs::read_to_string(self.dir.path().join(format!("n{i}/log")))
                {
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    eprintln!(
                        "--- garage node {i} log (last lines, newest first) ---\n{}",
                        tail.join("\n")
                    );
                }
            }
        }
        let _ = Command::new("bash")
            .arg(script())
            .arg("down")
            .arg(self.dir.path())
            .status();
    }
}
