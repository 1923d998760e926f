//! Why an invocation missed: its missed action keys, paired with another invocation's by
//! their first output, compared field by field from the Action and Command messages in
//! the CAS. No execution log is needed, and the comparison is `lre explain`'s own
//! ([`lre_action_diff`]), so the page and the command say the same thing.

use std::collections::{BTreeMap, HashMap, HashSet};

use bazel_remote_apis::build::bazel::remote::execution::v2::{Action, Command, Directory};
use prost::Message;
use serde::Serialize;

use crate::activity::{ActionRecord, InvocationSummary};
use crate::context::ServerContext;
use crate::digest::Digest;
use crate::error::Result;
use lre_action_diff::{Report, Spawn};

/// Missed actions explained per request; the rest are counted, not compared.
const MAX_EXPLAINED: usize = 500;
/// Actions of the base invocation read to find counterparts.
const MAX_BASE_ACTIONS: usize = 20_000;
/// Files listed per input tree, and directories walked per request (shared trees are
/// read once), so that a hostile tree costs a bounded amount.
const MAX_TREE_FILES: usize = 200_000;
const MAX_DIRECTORIES: usize = 100_000;
const MAX_DEPTH: usize = 128;
/// Action, Command and Directory messages larger than this are not read.
const MAX_MESSAGE: u64 = 4 << 20;
/// Tree nodes visited per request, counting repeats: a tree that names one directory
/// many times (a "bomb") expands to far more nodes than it has distinct directories.
const MAX_VISITS: usize = 1_000_000;
/// What one explanation may hold in memory, estimated from each message before it is
/// decoded: the counts above bound actions and files, but one Command of millions of
/// arguments decodes to about 100 MiB, and a request must not be able to grow the server
/// by that much per missed action. Past it the explanation stops and says so.
pub const BUDGET_BYTES: usize = 64 << 20;
/// What a decoded field costs beyond its encoded bytes (a String's header and allocation).
const PER_FIELD: usize = 80;
/// What one listed input file costs (its path and "hash/size" strings, a map node).
const PER_INPUT: usize = 256;

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub instance: String,
    pub base: InvocationSummary,
    pub new: InvocationSummary,
    /// Missed action keys of `new` that were looked at.
    pub missed: usize,
    /// Missed action keys beyond MAX_EXPLAINED, not compared.
    pub skipped: usize,
    /// Missed actions with a counterpart in `base`.
    pub common: usize,
    /// Missed actions that `base` did not have at all (their first outputs).
    pub only_new: Vec<String>,
    pub differing: Vec<Differing>,
    /// `/nix/store` paths behind the differences, on each side.
    pub store_paths_base: Vec<String>,
    pub store_paths_new: Vec<String>,
    /// Missed actions that could not be compared, and why.
    pub unexplained: Vec<Unexplained>,
    /// Set when the explanation stopped early: what it had compared and why it stopped
    /// (its memory budget, `BUDGET_BYTES`).
    pub stopped: Option<String>,
    /// Compared actions whose input trees could not be (Bazel uploads input trees only for
    /// remote execution, so a cache-only build's inputs are not in the CAS), and why.
    pub inputs_not_compared: usize,
    pub inputs_not_compared_reason: Option<String>,
}

/// One missed action and what differs from its counterpart in the base invocation.
#[derive(Debug, Serialize)]
pub struct Differing {
    pub output: String,
    pub target: String,
    pub mnemonic: String,
    pub action_base: String,
    pub action_new: String,
    pub differences: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Unexplained {
    pub action: String,
    pub mnemonic: String,
    pub target: String,
    pub reason: String,
}

/// Reads Action, Command and input trees, caching directories across actions, and counts
/// what it holds against the explanation's budget.
struct Reader<'a> {
    cache: &'a ServerContext,
    dirs: HashMap<Digest, Option<Directory>>,
    visits: usize,
    /// Estimated bytes held, and the budget.
    held: usize,
    budget: usize,
    /// Set once the budget is spent: nothing more is read.
    spent: bool,
}

/// Why the budget stopped a read (kept apart from the other reasons an action is not
/// compared, which only skip that action).
const SPENT: &str = "the explanation's memory budget is spent";

impl Reader<'_> {
    /// Counts `n` more bytes held; false (and nothing counted) if that passes the budget.
    fn charge(&mut self, n: usize) -> bool {
        if self.spent || self.held.saturating_add(n) > self.budget {
            self.spent = true;
            return false;
        }
        self.held += n;
        true
    }

    async fn message<M: Message + Default>(&mut self, d: &Digest) -> Result<Option<M>, String> {
        if d.size > MAX_MESSAGE {
            return Err(format!("{d} is larger than {MAX_MESSAGE} bytes; not read"));
        }
        if self.spent {
            return Err(SPENT.into());
        }
        match self.cache.read_blob(d).await {
            Ok(Some(raw)) => {
                // What decoding it would hold, judged before decoding: its bytes plus a
                // string's overhead per field (a Command's arguments are top-level fields).
                let (fields, _) = lre_store::wire::count_fields(&raw);
                if !self.charge(raw.len().saturating_add(fields.saturating_mul(PER_FIELD))) {
                    return Err(SPENT.into());
                }
                M::decode(raw)
                    .map(Some)
                    .map_err(|e| format!("{d} is not a valid message: {e}"))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(format!("reading {d}: {e}")),
        }
    }

    /// The spawn of an action key without its inputs, or why there is none.
    async fn spawn(&mut self, r: &ActionRecord) -> Result<(Spawn, Option<Digest>), String> {
        let action: Action = self.message(&r.digest).await?.ok_or_else(|| {
            "its Action is not in the CAS (a client that only reads never uploads it)".to_string()
        })?;
        // Everything an action names is under its own digest function.
        let function = r.digest.function;
        let command_digest = Digest::from_opt_proto(function, &action.command_digest)
            .map_err(|e| e.to_string())?
            .ok_or("its Action names no Command")?;
        let command: Command = self
            .message(&command_digest)
            .await?
            .ok_or("its Command is not in the CAS")?;
        #[allow(deprecated)]
        let platform = action.platform.as_ref().or(command.platform.as_ref());
        #[allow(deprecated)]
        let outputs = if command.output_paths.is_empty() {
            let mut v = command.output_files.clone();
            v.extend(command.output_directories.iter().cloned());
            v.sort();
            v
        } else {
            command.output_paths.clone()
        };
        let spawn = Spawn {
            mnemonic: r.mnemonic.clone(),
            target_label: r.target.clone(),
            args: command.arguments,
            env: command
                .environment_variables
                .into_iter()
                .map(|v| (v.name, v.value))
                .collect(),
            inputs: BTreeMap::new(),
            outputs,
            platform: platform
                .map(|p| {
                    p.properties
                        .iter()
                        .map(|p| (p.name.clone(), p.value.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            digest: Some(r.digest.to_string()),
            cache_hit: !r.missed,
        };
        let root = Digest::from_opt_proto(function, &action.input_root_digest)
            .map_err(|e| e.to_string())?;
        Ok((spawn, root))
    }

    /// Fills in the inputs of the spawns that have a counterpart (`paired`).
    async fn with_inputs(
        &mut self,
        list: Vec<(Spawn, Option<Digest>)>,
        paired: &HashSet<String>,
        skipped: &mut (usize, Option<String>),
    ) -> Vec<Spawn> {
        let mut out = Vec::with_capacity(list.len());
        for (mut s, root) in list {
            if let (true, Some(root)) = (paired.contains(&s.identity()), root) {
                match self.inputs(root).await {
                    Ok(i) => s.inputs = i,
                    Err(reason) => {
                        skipped.0 += 1;
                        skipped.1.get_or_insert(reason);
                    }
                }
            }
            out.push(s);
        }
        out
    }

    /// Every file under `root` as path → "hash/size", iteratively and within the bounds.
    async fn inputs(&mut self, root: Digest) -> Result<BTreeMap<String, String>, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(String::new(), root, 0usize)];
        while let Some((prefix, d, depth)) = stack.pop() {
            self.visits += 1;
            if self.visits > MAX_VISITS {
                return Err(format!(
                    "input trees of more than {MAX_VISITS} directories in all"
                ));
            }
            // Cached directories need no I/O: let other tasks run now and then.
            if self.visits.is_multiple_of(4096) {
                tokio::task::yield_now().await;
            }
            if depth > MAX_DEPTH {
                return Err(format!("input tree deeper than {MAX_DEPTH} levels"));
            }
            if !self.dirs.contains_key(&d) {
                if self.dirs.len() >= MAX_DIRECTORIES {
                    return Err(format!("more than {MAX_DIRECTORIES} input directories"));
                }
                let dir = self.message::<Directory>(&d).await?;
                self.dirs.insert(d, dir);
            }
            let listed = match self.dirs.get(&d) {
                Some(Some(dir)) => dir.files.len() + dir.symlinks.len(),
                _ => 0,
            };
            if !self.charge(listed.saturating_mul(PER_INPUT)) {
                return Err(SPENT.into());
            }
            let Some(Some(dir)) = self.dirs.get(&d) else {
                return Err(format!(
                    "input directory {d} is not in the CAS (Bazel uploads input trees only when it executes remotely)"
                ));
            };
            for f in &dir.files {
                if out.len() >= MAX_TREE_FILES {
                    return Err(format!("more than {MAX_TREE_FILES} input files"));
                }
                let digest = Digest::from_opt_proto(d.function, &f.digest)
                    .ok()
                    .flatten()
                    .map(|d| d.to_string())
                    .unwrap_or_default();
                out.insert(format!("{prefix}{}", f.name), digest);
            }
            for l in &dir.symlinks {
                if out.len() >= MAX_TREE_FILES {
                    return Err(format!("more than {MAX_TREE_FILES} input files"));
                }
                out.insert(format!("{prefix}{}", l.name), format!("-> {}", l.target));
            }
            for sub in &dir.directories {
                if let Ok(Some(sd)) = Digest::from_opt_proto(d.function, &sub.digest) {
                    stack.push((format!("{prefix}{}/", sub.name), sd, depth + 1));
                }
            }
        }
        Ok(out)
    }
}

/// Explains `new`'s missed actions against `base`.
pub async fn explain(
    cache: &ServerContext,
    instance: &str,
    base: (InvocationSummary, Vec<ActionRecord>),
    new: (InvocationSummary, Vec<ActionRecord>),
) -> Explanation {
    explain_within(cache, instance, base, new, BUDGET_BYTES).await
}

/// `explain`, holding at most about `budget` bytes.
pub async fn explain_within(
    cache: &ServerContext,
    instance: &str,
    base: (InvocationSummary, Vec<ActionRecord>),
    new: (InvocationSummary, Vec<ActionRecord>),
    budget: usize,
) -> Explanation {
    let mut reader = Reader {
        cache,
        dirs: HashMap::new(),
        visits: 0,
        held: 0,
        budget,
        spent: false,
    };
    let mut missed: Vec<&ActionRecord> = new.1.iter().filter(|r| r.missed).collect();
    missed.sort_by(|a, b| (&a.target, &a.mnemonic).cmp(&(&b.target, &b.mnemonic)));
    let skipped = missed.len().saturating_sub(MAX_EXPLAINED);
    missed.truncate(MAX_EXPLAINED);
    let mut unexplained = Vec::new();
    let mut new_spawns = Vec::new();
    let mut read_new = 0;
    for r in &missed {
        match reader.spawn(r).await {
            Ok(s) => new_spawns.push(s),
            Err(_) if reader.spent => break,
            Err(reason) => unexplained.push(Unexplained {
                action: r.digest.to_string(),
                mnemonic: r.mnemonic.clone(),
                target: r.target.clone(),
                reason,
            }),
        }
        read_new += 1;
    }
    let wanted: HashSet<String> = new_spawns.iter().map(|(s, _)| s.identity()).collect();
    // Bazel names each action's target: only the base's actions of the same targets can be
    // counterparts, which spares reading the rest. Without names, every one is a candidate.
    let targets: Option<HashSet<&str>> = missed
        .iter()
        .map(|r| (!r.target.is_empty()).then_some(r.target.as_str()))
        .collect();
    let candidates = base.1.iter().filter(|r| {
        targets
            .as_ref()
            .is_none_or(|t| r.target.is_empty() || t.contains(r.target.as_str()))
    });
    let mut base_spawns = Vec::new();
    let mut read_base = 0;
    for r in candidates.take(MAX_BASE_ACTIONS) {
        if reader.spent {
            break;
        }
        // A base action that cannot be read just has no counterpart.
        if let Ok(s) = reader.spawn(r).await {
            base_spawns.push(s);
        }
        read_base += 1;
    }
    // Input trees only for the pairs that get compared: they are the expensive part.
    let paired: HashSet<String> = base_spawns
        .iter()
        .map(|(s, _)| s.identity())
        .filter(|i| wanted.contains(i))
        .collect();
    let mut no_inputs = (0, None);
    let base_spawns = reader
        .with_inputs(base_spawns, &paired, &mut no_inputs)
        .await;
    let new_spawns = reader
        .with_inputs(new_spawns, &paired, &mut no_inputs)
        .await;
    let stopped = reader.spent.then(|| {
        format!(
            "stopped early: the explanation's memory budget ({} MiB) was spent after reading \
             {read_new} of the {} missed actions and {read_base} actions of the base \
             invocation; what they contain is compared, the rest is not",
            budget >> 20,
            missed.len()
        )
    });
    let Report {
        common,
        only_b,
        differing,
        store_paths_a,
        store_paths_b,
        ..
    } = lre_action_diff::compare(&base_spawns, &new_spawns);
    let new_keys: HashMap<String, &Spawn> = new_spawns.iter().map(|s| (s.identity(), s)).collect();
    let differing = differing
        .into_iter()
        .map(|(b, differences)| {
            let n = new_keys.get(&b.identity());
            Differing {
                output: b.identity(),
                target: n.map(|n| n.target_label.clone()).unwrap_or_default(),
                mnemonic: n.map(|n| n.mnemonic.clone()).unwrap_or_default(),
                action_base: b.digest.clone().unwrap_or_default(),
                action_new: n.and_then(|n| n.digest.clone()).unwrap_or_default(),
                differences,
            }
        })
        .collect();
    Explanation {
        instance: instance.to_string(),
        base: base.0,
        new: new.0,
        missed: missed.len(),
        skipped,
        common,
        only_new: only_b,
        differing,
        store_paths_base: store_paths_a.into_iter().collect(),
        store_paths_new: store_paths_b.into_iter().collect(),
        unexplained,
        stopped,
        inputs_not_compared: no_inputs.0,
        inputs_not_compared_reason: no_inputs.1,
    }
}
