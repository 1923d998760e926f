//! Rendering the generated files from the templates in `templates/`, compiled into the
//! binary so an installed `lre` needs no data files.

use serde::Serialize;
use sha2::{Digest, Sha256};
use tera::{Context, Tera, Value};

use crate::error::{Error, Result};

const TEMPLATES: &[(&str, &str)] = &[
    (
        "bazelrc.lre",
        include_str!("../../templates/bazelrc.lre.tera"),
    ),
    ("cc.BUILD", include_str!("../../templates/cc.BUILD.tera")),
    (
        "java.BUILD",
        include_str!("../../templates/java.BUILD.tera"),
    ),
    (
        "config.BUILD",
        include_str!("../../templates/config.BUILD.tera"),
    ),
    (
        "MODULE.bazel",
        include_str!("../../templates/MODULE.bazel.tera"),
    ),
];

/// The static half of @local-remote-execution, from `bazel/`.
pub const STATIC_FILES: &[(&str, &str)] = &[
    ("WORKSPACE", include_str!("../../bazel/WORKSPACE")),
    ("BUILD.bazel", include_str!("../../bazel/BUILD.bazel")),
    ("defs.bzl", include_str!("../../bazel/defs.bzl")),
    (
        "platforms/BUILD.bazel",
        include_str!("../../bazel/platforms/BUILD.bazel"),
    ),
];

pub struct Renderer {
    tera: Tera,
}

impl Renderer {
    pub fn new() -> Result<Renderer> {
        let mut tera = Tera::default();
        tera.autoescape_on(vec![]);
        tera.add_raw_templates(TEMPLATES.iter().copied())
            .map_err(|e| template_error("(all)", e))?;
        tera.register_filter("starlark", starlark_filter);
        Ok(Renderer { tera })
    }

    pub fn render(&self, name: &str, data: &impl Serialize) -> Result<String> {
        let ctx = Context::from_serialize(data).map_err(|e| template_error(name, e))?;
        let mut out = self
            .tera
            .render(name, &ctx)
            .map_err(|e| template_error(name, e))?;
        if !out.ends_with('\n') {
            out.push('\n');
        }
        Ok(out)
    }
}

fn template_error(name: &str, e: tera::Error) -> Error {
    // tera nests the useful message in its source chain.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Error::Template {
        name: name.to_owned(),
        message,
    }
}

/// `{{ x | starlark(indent=4) }}`: a string, list or dict as a Starlark literal, one item a
/// line when there is more than one, indented for a rule attribute.
fn starlark_filter(
    value: &Value,
    args: &std::collections::HashMap<String, Value>,
) -> tera::Result<Value> {
    let indent = args.get("indent").and_then(Value::as_u64).unwrap_or(0) as usize;
    Ok(Value::String(starlark(value, indent)))
}

pub fn starlark(value: &Value, indent: usize) -> String {
    let pad = " ".repeat(indent);
    match value {
        Value::String(s) => starlark_string(s),
        Value::Bool(b) => if *b { "True" } else { "False" }.to_owned(),
        Value::Number(n) => n.to_string(),
        Value::Null => "None".to_owned(),
        Value::Array(items) => match items.len() {
            0 => "[]".to_owned(),
            1 => format!("[{}]", starlark(&items[0], indent)),
            _ => {
                let body: String = items
                    .iter()
                    .map(|v| format!("{pad}    {},\n", starlark(v, indent + 4)))
                    .collect();
                format!("[\n{body}{pad}]")
            }
        },
        Value::Object(map) => match map.len() {
            0 => "{}".to_owned(),
            _ => {
                let body: String = map
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{pad}    {}: {},\n",
                            starlark_string(k),
                            starlark(v, indent + 4)
                        )
                    })
                    .collect();
                format!("{{\n{body}{pad}}}")
            }
        },
    }
}

fn starlark_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Files with `#` comments end with a checksum line, so a later run can tell its own
/// output from a copy edited by hand.
pub const CHECKSUM_PREFIX: &str = "# lre-checksum: sha256:";

pub fn with_checksum(body: &str) -> String {
    format!(
        "{body}{CHECKSUM_PREFIX}{}\n",
        hex::encode(Sha256::digest(body.as_bytes()))
    )
}

/// Whether `content` is exactly what `with_checksum` wrote (`None`: it has no checksum line).
pub fn checksum_intact(content: &str) -> Option<bool> {
    let trimmed = content.strip_suffix('\n')?;
    let start = trimmed.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let hexsum = trimmed[start..].strip_prefix(CHECKSUM_PREFIX)?;
    let body = &content[..start];
    Some(hex::encode(Sha256::digest(body.as_bytes())) == hexsum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn starlark_literals() {
        assert_eq!(starlark(&json!("a\"b\\c"), 0), r#""a\"b\\c""#);
        assert_eq!(starlark(&json!(["x"]), 4), r#"["x"]"#);
        assert_eq!(
            starlark(&json!(["x", "y"]), 4),
            "[\n        \"x\",\n        \"y\",\n    ]"
        );
        assert_eq!(
            starlark(&json!({"b": "1", "a": "2"}), 0),
            "{\n    \"a\": \"2\",\n    \"b\": \"1\",\n}"
        );
        assert_eq!(starlark(&json!(true), 0), "True");
    }

    #[test]
    fn checksums_tell_hand_edits() {
        let ours = with_checksum("build --x\n");
        assert_eq!(checksum_intact(&ours), Some(true));
        assert_eq!(checksum_intact(&ours.replace("--x", "--y")), Some(false));
        assert_eq!(checksum_intact("build --x\n"), None);
        assert_eq!(checksum_intact(""), None);
    }
}
