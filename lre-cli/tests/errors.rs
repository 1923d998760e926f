//! A failing `lre` command prints its error, causes and fix, never a stack trace, even
//! with `RUST_BACKTRACE=1` (which many Rust users keep set).

use std::process::Command;

#[test]
fn a_user_error_is_a_message_not_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-log.json");
    for backtrace in ["1", "full", "0"] {
        let out = Command::new(env!("CARGO_BIN_EXE_lre"))
            .args([
                "explain",
                missing.to_str().unwrap(),
                missing.to_str().unwrap(),
            ])
            .env("RUST_BACKTRACE", backtrace)
            .env("RUST_LIB_BACKTRACE", backtrace)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("error: ") && stderr.contains("no-such-log.json"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("Stack backtrace")
                && !stderr.contains("stack backtrace")
                && !stderr.contains("rust_begin_unwind"),
            "RUST_BACKTRACE={backtrace} printed a backtrace:\n{stderr}"
        );
    }
}
