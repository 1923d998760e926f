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
}

pub fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
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
    Ok(if r.differing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
