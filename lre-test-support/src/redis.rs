//! A real redis-server for tests, run by `e2e/redis/redis.sh` (the script the e2e tests use
//! too) on a loopback port, and stopped when dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::process::Command;

pub struct Redis {
    dir: tempfile::TempDir,
    pub url: String,
    pub port: u16,
}

fn script() -> PathBuf {
    crate::repo_root().join("e2e/redis/redis.sh")
}

impl Redis {
    /// Starts redis-server with extra arguments (`--requirepass x`, `--maxmemory 1mb`).
    pub fn up(args: &[&str]) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("bash")
            .arg(script())
            .arg("up")
            .arg(dir.path())
            .args(args)
            .output()
            .expect("running redis.sh");
        assert!(
            out.status.success(),
            "redis.sh up failed (is redis-server installed? apt-get install redis-server):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("env")).expect("redis env");
        let env: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        Redis {
            url: env["REDIS_URL"].to_owned(),
            port: env["REDIS_PORT"].parse().expect("port"),
            dir,
        }
    }

    fn run(&self, cmd: &str) {
        let st = Command::new("bash")
            .arg(script())
            .arg(cmd)
            .arg(self.dir.path())
            .status()
            .expect("running redis.sh");
        assert!(st.success(), "redis.sh {cmd} failed");
    }

    /// SIGKILL: its data is gone, as with a crashed cache Redis without persistence.
    pub fn kill(&self) {
        self.run("kill")
    }

    /// Starts it again on the same port and arguments, and waits until it answers.
    pub fn start(&self) {
        self.run("start")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("down")
            .arg(self.dir.path())
            .status();
    }
}

/// A loopback port nothing listens on (bound, then released).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}
