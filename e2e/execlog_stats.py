#!/usr/bin/env python3
"""Count remote cache hits in a Bazel 4.2.3 --execution_log_json_file.

Usage:
  execlog_stats.py EXEC_LOG.json [--baseline OTHER_EXEC_LOG.json]

Prints KEY=VALUE lines for `eval` on stdout and a human-readable breakdown
(misses, not-cacheable spawns) on stderr.

The file is a stream of pretty-printed JSON SpawnExec objects (not a JSON
array). Every spawn Bazel hands to a spawn runner is there, remote cache hits
included; Bazel's in-process "internal" actions (symlinks, runfiles trees,
param files, template expansion) never are.

  SPAWNS         all spawns in the log
  CACHEABLE      spawns Bazel looks up in the remote cache: remoteCacheable and
                 cacheable, minus test-XML spawns (below). Spawns tagged
                 no-remote-cache / no-cache / local / no-remote are excluded by
                 Bazel itself (remoteCacheable=false).
  HITS, MISSES   remote cache hits / misses among CACHEABLE
  NOT_CACHEABLE  spawns never looked up remotely (e.g. //gen:local_stamp)
  XMLGEN, XMLGEN_HITS
                 test-XML spawns (generate-xml.sh). They are remote-cacheable,
                 but their command line holds the test's run time in whole
                 seconds, so a build whose test result came from the cache asks
                 for a different key than the build that ran the test whenever
                 the durations round differently. Like the team's acceptance kit
                 we count them apart and leave them out of CACHEABLE.
  FAILED         spawns with a non-zero exit code or a status
  RUNNERS        e.g. "linux-sandbox:3,remote cache hit:21"

With --baseline, every CACHEABLE spawn is also classified as UNCHANGED (a spawn
with the same mnemonic, arguments, environment, platform, input digests and
outputs, i.e. the same action key, is in the baseline log) or CHANGED:
  CHANGED, CHANGED_HITS, UNCHANGED, UNCHANGED_HITS
"""
import collections
import json
import sys


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    dec = json.JSONDecoder()
    i, n, out = 0, len(text), []
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        obj, i = dec.raw_decode(text, i)
        out.append(obj)
    return out


def is_xmlgen(sp):
    args = sp.get("commandArgs") or [""]
    return sp.get("mnemonic") == "TestRunner" and args[0].endswith("tools/test/generate-xml.sh")


def is_cacheable(sp):
    return bool(sp.get("remoteCacheable", True)) and bool(sp.get("cacheable", True)) and not is_xmlgen(sp)


def signature(sp):
    """What determines the spawn's remote action key (as far as the log shows it)."""
    env = tuple(sorted((e.get("name", ""), e.get("value", "")) for e in sp.get("environmentVariables") or []))
    inputs = tuple(sorted((i.get("path", ""), (i.get("digest") or {}).get("hash", "")) for i in sp.get("inputs") or []))
    platform = json.dumps(sp.get("platform") or {}, sort_keys=True)
    return (sp.get("mnemonic", ""), tuple(sp.get("commandArgs") or []), env, inputs,
            tuple(sorted(sp.get("listedOutputs") or [])), platform)


def describe(sp):
    return "%s: %s" % (sp.get("mnemonic", "?"), sp.get("progressMessage", ""))


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    path, baseline = argv[0], None
    if "--baseline" in argv:
        baseline = argv[argv.index("--baseline") + 1]
    spawns = load(path)
    xmlgen = [sp for sp in spawns if is_xmlgen(sp)]
    cacheable = [sp for sp in spawns if is_cacheable(sp)]
    not_cacheable = [sp for sp in spawns if not is_cacheable(sp) and not is_xmlgen(sp)]
    hits = [sp for sp in cacheable if sp.get("remoteCacheHit")]
    misses = [sp for sp in cacheable if not sp.get("remoteCacheHit")]
    failed = [sp for sp in spawns if sp.get("exitCode", 0) != 0 or sp.get("status")]
    runners = collections.Counter(sp.get("runner", "?") for sp in spawns)

    out = {
        "SPAWNS": len(spawns),
        "CACHEABLE": len(cacheable),
        "HITS": len(hits),
        "MISSES": len(misses),
        "NOT_CACHEABLE": len(not_cacheable),
        "XMLGEN": len(xmlgen),
        "XMLGEN_HITS": sum(1 for sp in xmlgen if sp.get("remoteCacheHit")),
        "FAILED": len(failed),
    }
    changed = []
    if baseline is not None:
        base = {signature(sp) for sp in load(baseline)}
        changed = [sp for sp in cacheable if signature(sp) not in base]
        unchanged = [sp for sp in cacheable if signature(sp) in base]
        out["CHANGED"] = len(changed)
        out["CHANGED_HITS"] = sum(1 for sp in changed if sp.get("remoteCacheHit"))
        out["UNCHANGED"] = len(unchanged)
        out["UNCHANGED_HITS"] = sum(1 for sp in unchanged if sp.get("remoteCacheHit"))
    for k, v in out.items():
        print("%s=%d" % (k, v))
    print("RUNNERS='%s'" % ",".join("%s:%d" % kv for kv in sorted(runners.items())))

    err = sys.stderr
    for sp in not_cacheable:
        print("  not remote-cacheable (never looked up): %s" % describe(sp), file=err)
    for sp in misses:
        print("  cacheable but MISSED: %s [runner %s]" % (describe(sp), sp.get("runner", "?")), file=err)
    for sp in changed:
        if sp.get("remoteCacheHit"):
            print("  changed action HIT (should be impossible): %s" % describe(sp), file=err)
    for sp in failed:
        print("  failed spawn: %s exit=%s status=%s" % (describe(sp), sp.get("exitCode"), sp.get("status")), file=err)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
