//! The generated files for Bazel 4.2 (WORKSPACE), 7 and 8 (Bzlmod, rules_cc) against golden
//! copies in tests/golden/. Real Bazel 7/8 can't run on the test machine (no network to
//! fetch them or rules_cc), so their forms are pinned here; Bazel 4.2.3 runs the e2e test.
//! `LRE_BLESS=1 cargo test -p lre-cli --test golden` rewrites the golden files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lre_cli::env::Env;
use lre_cli::generate::{self, Endpoint, Settings};
use lre_cli::probe::{CcInfo, CompilerKind};
use lre_cli::toolchain::{JavaInfo, Toolchain};

const CC: &str = "/nix/store/8zy6k4qmvd0hjdwnba3xgzh0jps8xlyp-clang-wrapper-19.1.7";
const BINTOOLS: &str = "/nix/store/4hbcp1r6w0kgjhrmhhgw2bmfdi0vv6r2-binutils-wrapper-2.43.1";
const GLIBC: &str = "/nix/store/qbryq0pyr5rqfn9lsl6cjmkxjv8wz2bx-glibc-2.40-66-dev";
const JDK: &str =
    "/nix/store/9m3b0cc2xpmz9ii2qkqc1yqqcbc7l8r9-openjdk-headless-21.0.5+11/lib/openjdk";

fn toolchain() -> Toolchain {
    let tools = ["ar", "ld", "nm", "objcopy", "objdump", "strip"]
        .iter()
        .map(|t| (t.to_string(), format!("{BINTOOLS}/bin/{t}")))
        .chain([("gcc".to_string(), format!("{CC}/bin/cc"))])
        .collect::<BTreeMap<_, _>>();
    Toolchain {
        env: Env::from_entries(&[
            format!("CC={CC}/bin/cc"),
            format!("PATH={CC}/bin:{BINTOOLS}/bin"),
            format!("JAVA_HOME={JDK}"),
        ])
        .unwrap(),
        cc: Some(CcInfo {
            cc: format!("{CC}/bin/cc"),
            kind: CompilerKind::Clang,
            version: "19.1.7".into(),
            target: "x86_64-unknown-linux-gnu".into(),
            include_dirs: vec![
                format!("{CC}/resource-root/include"),
                format!("{GLIBC}/include"),
            ],
            tools,
        }),
        java: Some(JavaInfo {
            java_home: JDK.into(),
            version: Some(21),
        }),
        closure: vec![
            CC.into(),
            BINTOOLS.into(),
            GLIBC.into(),
            JDK.trim_end_matches("/lib/openjdk").into(),
        ],
        shell: Some(format!("{BINTOOLS}/bin/sh")),
    }
}

fn settings(bazel: &str, endpoint: bool) -> Settings {
    Settings {
        bazel: bazel.parse().unwrap(),
        prefix: Some("lre".into()),
        endpoint: endpoint.then(|| Endpoint {
            url: "grpcs://cache.example.com".into(),
            instance_name: Some("main".into()),
            read_only: true,
            cache_only: false,
        }),
        image: None,
        repo_dir: generate::DEFAULT_REPO_DIR.into(),
        allow_host_path: false,
    }
}

fn check(case: &str, bazel: &str, endpoint: bool) {
    let files = generate::plan(&toolchain(), &settings(bazel, endpoint)).unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case);
    let bless = std::env::var_os("LRE_BLESS").is_some();
    let mut mismatched = Vec::new();
    for f in &files {
        let path = dir.join(&f.path);
        if bless {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &f.content).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (LRE_BLESS=1 writes it)", path.display()));
        if want != f.content {
            mismatched.push(f.path.display().to_string());
        }
    }
    assert!(
        mismatched.is_empty(),
        "{case}: differ from golden: {mismatched:?}"
    );
    // Every golden file is produced: none is left over from an older form.
    let produced: Vec<PathBuf> = files.iter().map(|f| f.path.clone()).collect();
    for entry in walk(&dir) {
        let rel = entry.strip_prefix(&dir).unwrap().to_path_buf();
        assert!(
            produced.contains(&rel),
            "{case}: golden {} is no longer generated",
            rel.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn bazel_4_workspace_form() {
    check("bazel-4.2.3", "4.2.3", false);
}

#[test]
fn bazel_7_bzlmod_form_with_a_read_only_endpoint() {
    check("bazel-7.4.1", "7.4.1", true);
}

#[test]
fn bazel_8_rules_cc_form() {
    check("bazel-8.0.0", "8.0.0", false);
}

#[test]
fn the_forms_differ_where_bazel_does() {
    let get = |bazel: &str, endpoint: bool, path: &str| {
        generate::plan(&toolchain(), &settings(bazel, endpoint))
            .unwrap()
            .into_iter()
            .find(|f| f.path.ends_with(path))
            .unwrap()
            .content
    };
    let rc4 = get("4.2.3", false, ".bazelrc.lre");
    assert!(rc4.contains("build:lre --incompatible_enable_cc_toolchain_resolution\n"));
    assert!(rc4.contains("build:lre --javabase=@local-remote-execution//generated/java:runtime\n"));
    let rc7 = get("7.4.1", true, ".bazelrc.lre");
    assert!(!rc7.contains("--incompatible_enable_cc_toolchain_resolution"));
    assert!(rc7.contains("build:lre --java_runtime_version=lre_jdk\n"));
    assert!(rc7.contains("build:lre --remote_executor=grpcs://cache.example.com\n"));
    assert!(rc7.contains("build:lre --remote_instance_name=main\n"));
    assert!(rc7.contains("build:lre --noremote_upload_local_results\n"));
    let cc7 = get("7.4.1", false, "generated/cc/BUILD.bazel");
    assert!(cc7.contains("load(\"@bazel_tools//tools/cpp:unix_cc_toolchain_config.bzl\""));
    let cc8 = get("8.0.0", false, "generated/cc/BUILD.bazel");
    assert!(cc8.contains("load(\"@rules_cc//cc/private/toolchain:unix_cc_toolchain_config.bzl\""));
    assert!(get("8.0.0", false, "MODULE.bazel").contains("bazel_dep(name = \"rules_cc\""));
    let java8 = get("8.0.0", false, "generated/java/BUILD.bazel");
    assert!(
        java8.contains("load(\"@rules_java//java:defs.bzl\", \"java_runtime\")")
            && java8.contains("version = 21,")
    );
}

#[test]
fn write_compares_refuses_hand_edits_and_removes_stale_files() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    let repo = generate::DEFAULT_REPO_DIR;
    let files = generate::plan(&toolchain(), &settings("4.2.3", false)).unwrap();
    let first = generate::write(ws, repo, &files, false, false).unwrap();
    assert_eq!(first.written.len(), files.len());
    let second = generate::write(ws, repo, &files, false, false).unwrap();
    assert!(second.written.is_empty() && second.unchanged.len() == files.len());

    let rc = ws.join(".bazelrc.lre");
    let mut edited = std::fs::read_to_string(&rc).unwrap();
    edited.insert_str(0, "build --my-flag\n");
    std::fs::write(&rc, &edited).unwrap();
    let err = generate::write(ws, repo, &files, false, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("edited by hand") && err.contains(".bazelrc.lre"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&rc).unwrap(),
        edited,
        "the hand edit was lost"
    );
    let dry = generate::write(ws, repo, &files, true, true).unwrap();
    assert_eq!(dry.written, vec![PathBuf::from(".bazelrc.lre")]);
    assert_eq!(
        std::fs::read_to_string(&rc).unwrap(),
        edited,
        "a dry run wrote"
    );
    generate::write(ws, repo, &files, true, false).unwrap();

    // Without Java, the Java package a previous run wrote goes away.
    let mut no_java = toolchain();
    no_java.java = None;
    let files = generate::plan(&no_java, &settings("4.2.3", false)).unwrap();
    let third = generate::write(ws, repo, &files, false, false).unwrap();
    assert_eq!(
        third.removed,
        vec![Path::new(repo).join("generated/java/BUILD.bazel")]
    );
    assert!(!ws.join(repo).join("generated/java/BUILD.bazel").exists());
}
