//! Reading Bazel execution logs: `--execution_log_json_file` (a stream of JSON objects),
//! `--execution_log_binary_file` (length-delimited `SpawnExec`) and Bazel 7.1+'s
//! `--execution_log_compact_file` (zstd, length-delimited `ExecLogEntry`).
//!
//! The messages are declared here by hand: Bazel publishes spawn.proto only inside its own
//! source tree, and no crate carries it. Only the fields `lre explain` compares are declared;
//! prost skips the rest. Tags follow src/main/protobuf/spawn.proto.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use prost::Message;
use serde::Deserialize;

use crate::error::{Error, Result};

pub use lre_action_diff::Spawn;

pub fn read(path: &Path) -> Result<Vec<Spawn>> {
    let bytes = std::fs::read(path).map_err(crate::error::io(path))?;
    let fail = |reason: String| Error::ExecLog {
        path: path.to_owned(),
        reason,
    };
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let raw =
            zstd::decode_all(&bytes[..]).map_err(|e| fail(format!("not a zstd stream: {e}")))?;
        compact(&raw).map_err(fail)
    } else if first == Some(&b'{') {
        json(&bytes).map_err(fail)
    } else {
        binary(&bytes).map_err(fail)
    }
}

// ------------------------------------------------------------------ JSON

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct JsonSpawn {
    command_args: Vec<String>,
    environment_variables: Vec<JsonPair>,
    platform: Option<JsonPlatform>,
    inputs: Vec<JsonFile>,
    listed_outputs: Vec<String>,
    mnemonic: String,
    target_label: String,
    remote_cache_hit: bool,
    cache_hit: bool,
    digest: Option<JsonDigest>,
}
#[derive(Deserialize, Default)]
#[serde(default)]
struct JsonPair {
    name: String,
    value: String,
}
#[derive(Deserialize, Default)]
#[serde(default)]
struct JsonPlatform {
    properties: Vec<JsonPair>,
}
#[derive(Deserialize, Default)]
#[serde(default)]
struct JsonFile {
    path: String,
    digest: Option<JsonDigest>,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct JsonDigest {
    hash: String,
    #[serde(deserialize_with = "int_or_string")]
    size_bytes: i64,
}

/// protobuf's JSON form writes int64 as a string.
fn int_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        I(i64),
        S(String),
    }
    match N::deserialize(d)? {
        N::I(i) => Ok(i),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

fn digest_str(hash: &str, size: i64) -> String {
    format!("{hash}/{size}")
}

fn json(bytes: &[u8]) -> std::result::Result<Vec<Spawn>, String> {
    let mut out = Vec::new();
    for (i, item) in serde_json::Deserializer::from_slice(bytes)
        .into_iter::<JsonSpawn>()
        .enumerate()
    {
        let s = item.map_err(|e| format!("spawn {}: {e}", i + 1))?;
        out.push(Spawn {
            mnemonic: s.mnemonic,
            target_label: s.target_label,
            args: s.command_args,
            env: s
                .environment_variables
                .into_iter()
                .map(|p| (p.name, p.value))
                .collect(),
            inputs: s
                .inputs
                .into_iter()
                .map(|f| {
                    (
                        f.path,
                        f.digest
                            .map(|d| digest_str(&d.hash, d.size_bytes))
                            .unwrap_or_default(),
                    )
                })
                .collect(),
            outputs: sorted(s.listed_outputs),
            platform: s
                .platform
                .map(|p| {
                    p.properties
                        .into_iter()
                        .map(|p| (p.name, p.value))
                        .collect()
                })
                .unwrap_or_default(),
            digest: s.digest.map(|d| digest_str(&d.hash, d.size_bytes)),
            cache_hit: s.remote_cache_hit || s.cache_hit,
        });
    }
    Ok(out)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

// ------------------------------------------------------------------ binary

#[derive(Clone, PartialEq, Message)]
struct PDigest {
    #[prost(string, tag = "1")]
    hash: String,
    #[prost(int64, tag = "2")]
    size_bytes: i64,
}
#[derive(Clone, PartialEq, Message)]
struct PPair {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}
#[derive(Clone, PartialEq, Message)]
struct PPlatform {
    #[prost(message, repeated, tag = "1")]
    properties: Vec<PPair>,
}
#[derive(Clone, PartialEq, Message)]
struct PFile {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(message, optional, tag = "2")]
    digest: Option<PDigest>,
}
#[derive(Clone, PartialEq, Message)]
struct SpawnExec {
    #[prost(string, repeated, tag = "1")]
    command_args: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    environment_variables: Vec<PPair>,
    #[prost(message, optional, tag = "3")]
    platform: Option<PPlatform>,
    #[prost(message, repeated, tag = "4")]
    inputs: Vec<PFile>,
    #[prost(string, repeated, tag = "5")]
    listed_outputs: Vec<String>,
    #[prost(string, tag = "10")]
    mnemonic: String,
    #[prost(bool, tag = "13")]
    cache_hit: bool,
    #[prost(string, tag = "18")]
    target_label: String,
    #[prost(message, optional, tag = "19")]
    digest: Option<PDigest>,
}

fn pairs(v: Vec<PPair>) -> BTreeMap<String, String> {
    v.into_iter().map(|p| (p.name, p.value)).collect()
}

fn pdigest(d: &Option<PDigest>) -> Option<String> {
    d.as_ref().map(|d| digest_str(&d.hash, d.size_bytes))
}

fn delimited<M: Message + Default>(mut buf: &[u8]) -> std::result::Result<Vec<M>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let m = M::decode_length_delimited(&mut buf)
            .map_err(|e| format!("record {}: {e}", out.len() + 1))?;
        out.push(m);
    }
    Ok(out)
}

fn binary(bytes: &[u8]) -> std::result::Result<Vec<Spawn>, String> {
    Ok(delimited::<SpawnExec>(bytes)?
        .into_iter()
        .map(|s| Spawn {
            mnemonic: s.mnemonic,
            target_label: s.target_label,
            args: s.command_args,
            env: pairs(s.environment_variables),
            inputs: s
                .inputs
                .iter()
                .map(|f| (f.path.clone(), pdigest(&f.digest).unwrap_or_default()))
                .collect(),
            outputs: sorted(s.listed_outputs),
            platform: s.platform.map(|p| pairs(p.properties)).unwrap_or_default(),
            digest: pdigest(&s.digest),
            cache_hit: s.cache_hit,
        })
        .collect())
}

// ------------------------------------------------------------------ compact

#[derive(Clone, PartialEq, Message)]
struct Entry {
    #[prost(uint32, tag = "1")]
    id: u32,
    #[prost(oneof = "Payload", tags = "3, 4, 5, 6, 7, 10")]
    payload: Option<Payload>,
}
#[derive(Clone, PartialEq, prost::Oneof)]
enum Payload {
    #[prost(message, tag = "3")]
    File(PFile),
    #[prost(message, tag = "4")]
    Directory(CDirectory),
    #[prost(message, tag = "5")]
    Symlink(CSymlink),
    #[prost(message, tag = "6")]
    InputSet(CInputSet),
    #[prost(message, tag = "7")]
    Spawn(CSpawn),
    #[prost(message, tag = "10")]
    Runfiles(CRunfiles),
}
#[derive(Clone, PartialEq, Message)]
struct CDirectory {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(message, repeated, tag = "2")]
    files: Vec<PFile>,
}
#[derive(Clone, PartialEq, Message)]
struct CSymlink {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(string, tag = "2")]
    target_path: String,
}
#[derive(Clone, PartialEq, Message)]
struct CInputSet {
    #[prost(uint32, repeated, tag = "5")]
    input_ids: Vec<u32>,
    #[prost(uint32, repeated, tag = "4")]
    transitive_set_ids: Vec<u32>,
}
#[derive(Clone, PartialEq, Message)]
struct CRunfiles {
    #[prost(string, tag = "1")]
    path: String,
}
#[derive(Clone, PartialEq, Message)]
struct COutput {
    #[prost(uint32, tag = "5")]
    output_id: u32,
    #[prost(string, tag = "4")]
    invalid_output_path: String,
}
#[derive(Clone, PartialEq, Message)]
struct CSpawn {
    #[prost(string, repeated, tag = "1")]
    args: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    env_vars: Vec<PPair>,
    #[prost(message, optional, tag = "3")]
    platform: Option<PPlatform>,
    #[prost(uint32, tag = "4")]
    input_set_id: u32,
    #[prost(message, repeated, tag = "6")]
    outputs: Vec<COutput>,
    #[prost(string, tag = "7")]
    target_label: String,
    #[prost(string, tag = "8")]
    mnemonic: String,
    #[prost(bool, tag = "12")]
    cache_hit: bool,
    #[prost(message, optional, tag = "16")]
    digest: Option<PDigest>,
}

fn compact(raw: &[u8]) -> std::result::Result<Vec<Spawn>, String> {
    let mut entries: HashMap<u32, Payload> = HashMap::new();
    let mut out = Vec::new();
    for e in delimited::<Entry>(raw)? {
        match e.payload {
            Some(Payload::Spawn(s)) => out.push(compact_spawn(s, &entries)?),
            Some(p) if e.id != 0 => {
                entries.insert(e.id, p);
            }
            _ => {}
        }
    }
    Ok(out)
}

fn compact_spawn(s: CSpawn, entries: &HashMap<u32, Payload>) -> std::result::Result<Spawn, String> {
    let mut inputs = BTreeMap::new();
    let mut stack = vec![s.input_set_id];
    let mut seen = std::collections::HashSet::new();
    while let Some(set) = stack.pop() {
        if set == 0 || !seen.insert(set) {
            continue;
        }
        let Some(Payload::InputSet(is)) = entries.get(&set) else {
            return Err(format!(
                "input set {set} is referenced before it is defined"
            ));
        };
        stack.extend(&is.transitive_set_ids);
        for id in &is.input_ids {
            match entries.get(id) {
                Some(Payload::File(f)) => {
                    inputs.insert(f.path.clone(), pdigest(&f.digest).unwrap_or_default());
                }
                Some(Payload::Directory(d)) => {
                    for f in &d.files {
                        inputs.insert(
                            format!("{}/{}", d.path, f.path),
                            pdigest(&f.digest).unwrap_or_default(),
                        );
                    }
                }
                Some(Payload::Symlink(l)) => {
                    inputs.insert(l.path.clone(), format!("-> {}", l.target_path));
                }
                Some(Payload::Runfiles(r)) => {
                    inputs.insert(r.path.clone(), String::new());
                }
                _ => return Err(format!("input {id} is referenced before it is defined")),
            }
        }
    }
    let outputs = s
        .outputs
        .iter()
        .map(|o| match entries.get(&o.output_id) {
            Some(Payload::File(f)) => f.path.clone(),
            Some(Payload::Directory(d)) => d.path.clone(),
            Some(Payload::Symlink(l)) => l.path.clone(),
            _ => o.invalid_output_path.clone(),
        })
        .collect();
    Ok(Spawn {
        mnemonic: s.mnemonic,
        target_label: s.target_label,
        args: s.args,
        env: pairs(s.env_vars),
        inputs,
        outputs: sorted(outputs),
        platform: s.platform.map(|p| pairs(p.properties)).unwrap_or_default(),
        digest: pdigest(&s.digest),
        cache_hit: s.cache_hit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_exec(arg0: &str) -> SpawnExec {
        SpawnExec {
            command_args: vec![arg0.into(), "-c".into()],
            environment_variables: vec![PPair {
                name: "PATH".into(),
                value: "/nix/store/a/bin".into(),
            }],
            platform: Some(PPlatform {
                properties: vec![PPair {
                    name: "OSFamily".into(),
                    value: "Linux".into(),
                }],
            }),
            inputs: vec![PFile {
                path: "a.cc".into(),
                digest: Some(PDigest {
                    hash: "ab".into(),
                    size_bytes: 3,
                }),
            }],
            listed_outputs: vec!["bazel-out/a.o".into()],
            mnemonic: "CppCompile".into(),
            cache_hit: true,
            target_label: "//:a".into(),
            digest: None,
        }
    }

    #[test]
    fn binary_and_json_logs_read_alike() {
        let mut bin = Vec::new();
        for a in ["/nix/store/x/bin/cc", "/nix/store/y/bin/cc"] {
            spawn_exec(a).encode_length_delimited(&mut bin).unwrap();
        }
        let from_bin = binary(&bin).unwrap();
        let json_text = r#"{
  "commandArgs": ["/nix/store/x/bin/cc", "-c"],
  "environmentVariables": [{"name": "PATH", "value": "/nix/store/a/bin"}],
  "platform": {"properties": [{"name": "OSFamily", "value": "Linux"}]},
  "inputs": [{"path": "a.cc", "digest": {"hash": "ab", "sizeBytes": "3", "hashFunctionName": "SHA-256"}}],
  "listedOutputs": ["bazel-out/a.o"],
  "remotable": true,
  "mnemonic": "CppCompile",
  "remoteCacheHit": true,
  "targetLabel": "//:a"
}{"commandArgs": ["/nix/store/y/bin/cc", "-c"], "environmentVariables": [{"name": "PATH", "value": "/nix/store/a/bin"}],
  "platform": {"properties": [{"name": "OSFamily", "value": "Linux"}]},
  "inputs": [{"path": "a.cc", "digest": {"hash": "ab", "sizeBytes": 3}}], "listedOutputs": ["bazel-out/a.o"],
  "mnemonic": "CppCompile", "remoteCacheHit": true, "targetLabel": "//:a"}"#;
        let from_json = json(json_text.as_bytes()).unwrap();
        assert_eq!(from_bin, from_json);
        assert_eq!(from_bin.len(), 2);
        assert_eq!(from_bin[0].inputs["a.cc"], "ab/3");
        assert!(from_bin[0].cache_hit);
    }

    #[test]
    fn compact_logs_resolve_input_sets() {
        let mut raw = Vec::new();
        let entries = vec![
            Entry {
                id: 1,
                payload: Some(Payload::File(PFile {
                    path: "a.cc".into(),
                    digest: Some(PDigest {
                        hash: "ab".into(),
                        size_bytes: 3,
                    }),
                })),
            },
            Entry {
                id: 2,
                payload: Some(Payload::Directory(CDirectory {
                    path: "inc".into(),
                    files: vec![PFile {
                        path: "x.h".into(),
                        digest: None,
                    }],
                })),
            },
            Entry {
                id: 3,
                payload: Some(Payload::InputSet(CInputSet {
                    input_ids: vec![2],
                    transitive_set_ids: vec![],
                })),
            },
            Entry {
                id: 4,
                payload: Some(Payload::InputSet(CInputSet {
                    input_ids: vec![1],
                    transitive_set_ids: vec![3],
                })),
            },
            Entry {
                id: 5,
                payload: Some(Payload::File(PFile {
                    path: "bazel-out/a.o".into(),
                    digest: None,
                })),
            },
            Entry {
                id: 0,
                payload: Some(Payload::Spawn(CSpawn {
                    args: vec!["cc".into()],
                    input_set_id: 4,
                    outputs: vec![COutput {
                        output_id: 5,
                        invalid_output_path: String::new(),
                    }],
                    mnemonic: "CppCompile".into(),
                    digest: Some(PDigest {
                        hash: "k".into(),
                        size_bytes: 9,
                    }),
                    ..Default::default()
                })),
            },
        ];
        for e in entries {
            e.encode_length_delimited(&mut raw).unwrap();
        }
        let spawns = compact(&raw).unwrap();
        assert_eq!(spawns.len(), 1);
        assert_eq!(spawns[0].outputs, vec!["bazel-out/a.o".to_string()]);
        assert_eq!(
            spawns[0].inputs.keys().collect::<Vec<_>>(),
            vec!["a.cc", "inc/x.h"]
        );
        assert_eq!(spawns[0].digest.as_deref(), Some("k/9"));
    }

    #[test]
    fn broken_logs_are_errors_not_empty_results() {
        assert!(json(b"{\"commandArgs\": [1]}").is_err());
        assert!(binary(&[0x05, 0x0a]).is_err());
        let mut raw = Vec::new();
        Entry {
            id: 0,
            payload: Some(Payload::Spawn(CSpawn {
                input_set_id: 7,
                ..Default::default()
            })),
        }
        .encode_length_delimited(&mut raw)
        .unwrap();
        assert!(compact(&raw).unwrap_err().contains("input set 7"));
    }
}
