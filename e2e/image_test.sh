#!/usr/bin/env bash
# e2e/image_test.sh
#
# Worker images end to end: the zig toolchain of e2e/toolchains plus a self-contained
# lre-worker (and its bubblewrap) as an OCI image, pushed to Debian's docker-registry on
# 127.0.0.1, read back with skopeo, unpacked with umoci and run with bubblewrap as the only
# root filesystem (no Docker engine here), serving a real Bazel 4.2.3 build.
#   1 push       lre's digest is what skopeo sees; skopeo copy back gives the same blobs
#   2 repro      a second build in another directory gives the identical manifest digest
#   3 update     a changed toolchain re-pushes only the layers that changed (bytes counted)
#   4 run        the unpacked image's worker serves a --config=lre remote build of the
#                fixture (generated with --image); everything ran from the image's store
#   5 routing    an action pinned to another image digest is refused, naming container-image
#   6 errors     unreachable registry, 401 without credentials (basic auth works), a
#                registry rejecting the manifest, a corrupt layer: clear errors, and the
#                tag still names the last good image
#   7 kubernetes the manifests in deploy/kubernetes pass kubernetes-validate --strict (the
#                Kubernetes 1.37 schemas, from PyPI) and their server config passes
#                lre-server check-config; a broken copy fails (the check is not vacuous)
# Prints PASS/FAIL lines and, last, "N passed, M failed".
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LRE="${LRE:-$REPO_ROOT/target/debug/lre}"
LRE_WORKER="${LRE_WORKER:-$REPO_ROOT/target/debug/lre-worker}"
TC_DIR="${E2E_TOOLCHAIN_DIR:-$E2E_DIR/.work/toolchain}"
export NIX_CONFIG="${NIX_CONFIG:-$'experimental-features = nix-command flakes\nsandbox = false\nbuild-users-group =\nsubstituters ='}"
BAZEL_VERB=build
# Error messages as users see them, without backtraces.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
# The image runs C/C++ only: the test JRE is the host's, linked against the host's libc.
BAZEL_TARGETS=(//app:hello //lib/... //tests/... //gen:version_h)

# start_registry NAME [htpasswd-file]: docker-registry on a free port; sets REG.
start_registry() {
  local name="$1" htpasswd="${2:-}" port; port="$(free_port)"
  mkdir -p "$SCEN/$name"
  {
    printf 'version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: %s\n' "$SCEN/$name/data"
    printf 'http:\n  addr: 127.0.0.1:%s\n' "$port"
    [ -n "$htpasswd" ] && printf 'auth:\n  htpasswd:\n    realm: lre-e2e\n    path: %s\n' "$htpasswd"
  } >"$SCEN/$name/config.yml"
  start_bg "$name" docker-registry serve "$SCEN/$name/config.yml"
  REG="127.0.0.1:$port"
  local deadline=$((SECONDS + 20))
  while [ "$SECONDS" -lt "$deadline" ]; do
    curl -s -o /dev/null "http://$REG/v2/" && return 0
    sleep 0.2
  done
  return 1
}
registry_blobs() { find "$1/docker/registry/v2/blobs" -name data 2>/dev/null | wc -l; }

# build_image OUT CC_NIX: lre image build; sets DIGEST (what lre printed).
build_image() {
  DIGEST="$("$LRE" image build --cc "$2" --java "$TC_DIR/java.nix" --worker "$WORKER/bin/lre-worker" \
    --out "$1" 2>>"$SCEN/build.log")"
}
# push LAYOUT REF [ARGS...]: lre image push; sets PINNED, PUSH_RC, PUSH_LOG.
push() {
  local layout="$1" ref="$2"; shift 2
  PUSH_LOG="$SCEN/push-$(date +%s%N).log"
  PINNED="$("$LRE" image push "$ref" --layout "$layout" --plain-http "$@" 2>"$PUSH_LOG")"
  PUSH_RC=$?
}
inspect_digest() { skopeo inspect --tls-verify=false "docker://$1" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["Digest"])'; }
same_blobs() { diff <(cd "$1/blobs/sha256" && ls | sort) <(cd "$2/blobs/sha256" && ls | sort) >/dev/null &&
  (cd "$1/blobs/sha256" && sha256sum -c --quiet <(ls | sed 's/.*/&  &/')) >/dev/null; }

prepare() {
  new_scenario image
  check "toolchains built with Nix" "log image/prepare.log" bash -c "{ bash '$E2E_DIR/toolchains/prepare.sh' '$TC_DIR' &&
    nix-build '$TC_DIR/cc.nix' --no-out-link && nix-build '$TC_DIR/java.nix' --no-out-link; } >'$SCEN/prepare.log' 2>&1" || return 1
  WORKER="$(bash "$E2E_DIR/toolchains/bundle-worker.sh" "$TC_DIR" "$LRE_WORKER" 2>"$SCEN/bundle.log")"
  check "a self-contained lre-worker bundle (worker + bwrap + their libraries) in the store" "$WORKER" \
    bundle_ok "$WORKER" || return 1
  printf 'import ./cc.nix { variant = "2"; }\n' >"$TC_DIR/cc-variant.nix"
}
# Its closure is itself: no reference to a host path.
bundle_ok() { [ -x "$1/bin/lre-worker" ] && [ -x "$1/bin/bwrap" ] && [ "$(nix-store -qR "$1")" = "$1" ]; }

scenario_push() {
  check "1 push: docker-registry serves on 127.0.0.1" "" start_registry registry || return 1
  build_image "$SCEN/img-a" "$TC_DIR/cc.nix"
  IMG_A="$DIGEST"
  check "1 push: lre image build writes an OCI layout and prints its digest" "$DIGEST; $(tail -n1 "$SCEN/build.log")" \
    grep -q "\"$DIGEST\"" "$SCEN/img-a/index.json"
  push "$SCEN/img-a" "$REG/lre/worker:e2e"
  check "1 push: lre image push prints REGISTRY/NAME@DIGEST" "$PINNED; $(tail -n1 "$PUSH_LOG")" \
    [ "$PUSH_RC" = 0 -a "$PINNED" = "$REG/lre/worker@$IMG_A" ]
  local seen; seen="$(inspect_digest "$REG/lre/worker:e2e")"
  check "1 push: skopeo inspect shows the digest lre printed" "$seen" [ "$seen" = "$DIGEST" ]
  skopeo copy -q --src-tls-verify=false "docker://$REG/lre/worker:e2e" "oci:$SCEN/copy:e2e" >"$SCEN/copy.log" 2>&1
  check "1 push: skopeo copy back to an OCI layout gives identical blobs" \
    "$(ls "$SCEN/copy/blobs/sha256" 2>/dev/null | wc -l) blobs" same_blobs "$SCEN/img-a" "$SCEN/copy"
  push "$SCEN/img-a" "$REG/lre/worker:e2e"
  check "1 push: pushing again uploads nothing" "$(tail -n1 "$PUSH_LOG")" grep -q "^lre image push: 0 blob(s) uploaded" "$PUSH_LOG"
}

scenario_repro() {
  local first="$IMG_A"
  build_image "$SCEN/elsewhere/img-b" "$TC_DIR/cc.nix"
  check "2 repro: a build in another directory has the identical digest and bytes" "$DIGEST" \
    bash -c "[ '$DIGEST' = '$first' ] && diff -r '$SCEN/img-a' '$SCEN/elsewhere/img-b' >/dev/null"
}

scenario_update() {
  local before after
  nix-build "$TC_DIR/cc-variant.nix" --no-out-link >>"$SCEN/prepare.log" 2>&1
  build_image "$SCEN/img-v2" "$TC_DIR/cc-variant.nix"
  check "3 update: the changed toolchain has a new digest" "$DIGEST" [ "$DIGEST" != "$IMG_A" ]
  before="$(registry_blobs "$SCEN/registry/data")"
  push "$SCEN/img-v2" "$REG/lre/worker:e2e-v2"
  after="$(registry_blobs "$SCEN/registry/data")"
  local line; line="$(grep '^lre image push:' "$PUSH_LOG")"
  # The changed store path's layer, the runtime layer (its closure list) and the config.
  check "3 update: only the changed layers are uploaded" "$line; registry blobs $before -> $after" \
    update_ok "$line" "$before" "$after"
}
update_ok() {
  [ "$PUSH_RC" = 0 ] && [[ $1 =~ ^lre\ image\ push:\ 3\ blob\(s\)\ uploaded\ \(([0-9]+)\ bytes\),\ 5\ already ]] &&
    [ "$3" = $(($2 + 4)) ]   # three blobs and the manifest
}

scenario_run() {
  local n="4 run" rootfs="$SCEN/unpacked/rootfs" port; port="$(free_ports 2)"
  GRPC_PORT="${port%%$'\n'*}"; HTTP_PORT="${port##*$'\n'}"
  umoci unpack --rootless --image "$SCEN/img-a:latest" "$SCEN/unpacked" >"$SCEN/umoci.log" 2>&1
  check "$n: umoci unpacks the image" "" test -x "$rootfs/bin/lre-worker" || return 0
  check "$n: the image has no host files: only bin, etc, nix, tmp" "$(ls "$rootfs" | tr '\n' ' ')" \
    [ "$(ls "$rootfs" | tr '\n' ' ')" = "bin etc nix tmp " ]
  server_config
  start_bg server "$LRE_SERVER" --config "$SCEN/server.toml"
  check "$n: lre-server up" "" wait_healthy "$HTTP_PORT" || return 0
  mkdir -p "$SCEN/worker-work"
  # The image is the whole root: the host's /usr, /bin and /lib are not there.
  start_bg worker bwrap --unshare-all --share-net --die-with-parent --bind "$rootfs" / --dev /dev --proc /proc \
    --tmpfs /tmp --ro-bind "$SCEN/worker.token" /tmp/lre-worker.token --bind "$SCEN/worker-work" /work \
    --clearenv --setenv PATH /bin \
    -- /bin/lre-worker --server "http://127.0.0.1:$GRPC_PORT" --id image-worker --capacity 2 \
    --token-file /tmp/lre-worker.token --work-dir /work --host-proc --image "$REG/lre/worker@$IMG_A"
  check "$n: the worker in the image connects, offering its pinned image" "" \
    wait_log "$SCEN/server.log" "worker connected" 1 || { tail -n 5 "$SCEN/worker.log" >&2; return 0; }

  new_client "$SCEN" R
  (cd "$E2E_DIR/workspaces/lre" && tar --exclude=README.md -cf - .) | (cd "$CL_WS" && tar -xf -)
  RUN_WS="$CL_WS"
  (cd "$CL_WS" && "$LRE" generate --cc "$TC_DIR/cc.nix" --java "$TC_DIR/java.nix" --prefix lre \
    --bazel-version 4.2.3 --endpoint "grpc://127.0.0.1:$GRPC_PORT" --image "$REG/lre/worker@$IMG_A") \
    >"$SCEN/gen.log" 2>&1
  check "$n: lre generate --image pins container-image=docker://…@sha256 in the platform" "" \
    grep -q "\"container-image\": \"docker://$REG/lre/worker@$IMG_A\"" "$CL_WS/.lre/local-remote-execution/generated/config/BUILD.bazel"
  bazel_run "$CL_WS" "$CL_OUR" --config=lre
  cp "$BZ_LOG" "$SCEN/run-build.log"
  check "$n: a --config=lre remote build runs every action on the image's worker" "exit $BZ_RC; '$SUM_LINE'" \
    all_remote "$(remote_count)" || show_misses
  BIN_OUT="$(run_binary "$CL_WS")"
  check "$n: the binary built inside the image runs" "got '$BIN_OUT'" output_is_expected
}

scenario_routing() {
  local n="5 routing" other="sha256:$(printf '0%.0s' $(seq 64))"
  mkdir -p "$RUN_WS/pinned"
  cat >"$RUN_WS/pinned/BUILD" <<EOT
genrule(
    name = "elsewhere",
    outs = ["elsewhere.txt"],
    cmd = "echo never > \$@",
    exec_properties = {"container-image": "docker://$REG/lre/worker@$other"},
)
EOT
  local -a saved=("${BAZEL_TARGETS[@]}")
  BAZEL_TARGETS=(//pinned:elsewhere)
  bazel_run "$RUN_WS" "$CL_OUR" --config=lre
  BAZEL_TARGETS=("${saved[@]}")
  check "$n: an action pinned to another image is refused, naming container-image" "exit $BZ_RC" \
    refused_naming "container-image=docker://$REG/lre/worker@$other"
}
refused_naming() { [ "$BZ_RC" != 0 ] && grep -qF "$1" "$BZ_LOG"; }

scenario_errors() {
  local n="6 errors" good="$IMG_A"
  push "$SCEN/img-a" "127.0.0.1:$(free_port)/lre/worker:e2e"
  check "$n: an unreachable registry is a clear error" "exit $PUSH_RC: $(tail -n1 "$PUSH_LOG" | cut -c1-160)" \
    failed_with "unreachable"
  htpasswd -Bbc "$SCEN/htpasswd" ci s3cret >/dev/null 2>&1
  check "$n: a registry with basic auth serves" "" start_registry secured "$SCEN/htpasswd" || return 0
  push "$SCEN/img-a" "$REG/lre/worker:e2e"
  check "$n: without credentials, a 401 says how to give them" "exit $PUSH_RC: $(tail -n1 "$PUSH_LOG" | cut -c1-160)" \
    failed_with "refused the credentials"
  LRE_REGISTRY_USERNAME=ci LRE_REGISTRY_PASSWORD=s3cret push "$SCEN/img-a" "$REG/lre/worker:e2e"
  check "$n: with basic auth from the environment the push succeeds" "$PINNED" [ "$PUSH_RC" = 0 -a "$PINNED" = "$REG/lre/worker@$good" ]

  # A manifest the registry must reject (schemaVersion 3), its blobs all valid.
  local bad="$SCEN/img-bad"
  cp -r "$SCEN/img-a" "$bad"
  python3 - "$bad" <<'PYEOF'
import hashlib, json, os, sys
d = sys.argv[1]; index = json.load(open(f"{d}/index.json"))
old = index["manifests"][0]["digest"].split(":")[1]
m = json.load(open(f"{d}/blobs/sha256/{old}")); m["schemaVersion"] = 3
raw = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
new = hashlib.sha256(raw).hexdigest(); open(f"{d}/blobs/sha256/{new}", "wb").write(raw)
index["manifests"][0]["digest"] = f"sha256:{new}"; index["manifests"][0]["size"] = len(raw)
json.dump(index, open(f"{d}/index.json", "w"))
PYEOF
  LRE_REGISTRY_USERNAME=ci LRE_REGISTRY_PASSWORD=s3cret push "$bad" "$REG/lre/worker:e2e"
  check "$n: a rejected manifest is a clear error" "exit $PUSH_RC: $(tail -n1 "$PUSH_LOG" | cut -c1-160)" \
    failed_with "rejected the manifest"
  local now; now="$(skopeo inspect --tls-verify=false --creds ci:s3cret "docker://$REG/lre/worker:e2e" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["Digest"])')"
  check "$n: after the failed push the tag still names the good image" "$now" [ "$now" = "$good" ]

  # A layer whose bytes don't match its digest (a corrupt layout) never lands in the registry.
  # The runtime layer (last) is new to this registry, so it must be uploaded.
  local corrupt="$SCEN/img-corrupt" layer
  cp -r "$SCEN/img-v2" "$corrupt"
  layer="$(python3 -c "import json,sys; d='$corrupt'; i=json.load(open(d+'/index.json')); m=json.load(open(d+'/blobs/sha256/'+i['manifests'][0]['digest'][7:])); print(m['layers'][-1]['digest'][7:])")"
  printf 'x' >>"$corrupt/blobs/sha256/$layer"
  LRE_REGISTRY_USERNAME=ci LRE_REGISTRY_PASSWORD=s3cret push "$corrupt" "$REG/lre/worker:corrupt"
  check "$n: a corrupt layer is refused and the tag is not created" "exit $PUSH_RC: $(tail -n1 "$PUSH_LOG" | cut -c1-160)" \
    corrupt_refused "$layer"
}
failed_with() { [ "$PUSH_RC" != 0 ] && [ -z "$PINNED" ] && grep -q "$1" "$PUSH_LOG"; }
corrupt_refused() {
  [ "$PUSH_RC" != 0 ] && [ -z "$PINNED" ] &&
    ! skopeo inspect --tls-verify=false --creds ci:s3cret "docker://$REG/lre/worker:corrupt" >/dev/null 2>&1 &&
    ! find "$SCEN/secured/data" -path "*$1*" -name data | grep -q .
}

# checked_config RC FILE: check-config passed on a config that was really extracted.
checked_config() { [ "$1" = 0 ] && [ -s "$2" ]; }

scenario_kubernetes() {
  local n="7 kubernetes" py="$E2E_DIR/.work/pydeps" dir="$REPO_ROOT/deploy/kubernetes"
  [ -d "$py/kubernetes_validate" ] || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet \
    --disable-pip-version-check --root-user-action=ignore --target "$py" kubernetes-validate >"$SCEN/pip.log" 2>&1
  local rc
  PYTHONPATH="$py" python3 -m kubernetes_validate --strict "$dir"/*.yaml >"$SCEN/k8s.log" 2>&1; rc=$?
  check "$n: every manifest validates against the Kubernetes schemas (strict)" \
    "$(grep -c passed "$SCEN/k8s.log") resources passed" [ "$rc" = 0 ]
  sed 's/replicas: 4/replicas: four/' "$dir/lre-worker.yaml" >"$SCEN/broken.yaml"
  PYTHONPATH="$py" python3 -m kubernetes_validate --strict "$SCEN/broken.yaml" >"$SCEN/k8s-broken.log" 2>&1; rc=$?
  check "$n: a broken manifest fails the same validation" "" [ "$rc" != 0 ]
  local m
  for m in lre-server lre-cache-cluster; do
    PYTHONPATH="$py" python3 -c 'import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d["kind"] == "ConfigMap" and "lre-server.toml" in d["data"]: print(d["data"]["lre-server.toml"])' "$dir/$m.yaml" >"$SCEN/k8s-$m.toml"
    "$LRE_SERVER" --config "$SCEN/k8s-$m.toml" check-config >"$SCEN/k8s-check-$m.log" 2>&1; rc=$?
    check "$n: the server config in $m.yaml's ConfigMap passes lre-server check-config" \
      "$(head -c 200 "$SCEN/k8s-check-$m.log")" checked_config "$rc" "$SCEN/k8s-$m.toml"
  done
  check "$n: the worker Deployment runs the image by digest and passes the same digest as LRE_IMAGE" "" \
    same_pinned_image "$dir/lre-worker.yaml"
  # Worker credentials: a file from a Secret, never a flag or an environment variable.
  check "$n: the worker passes --token-file and no token in args or env (--token, LRE_WORKER_TOKEN, LRE_TOKEN)" \
    "" k8s_worker_token "$py" "$dir/lre-worker.yaml" flags
  check "$n: the worker's --token-file is on a read-only Secret volume (defaultMode 0400)" \
    "" k8s_worker_token "$py" "$dir/lre-worker.yaml" volume
  sed 's|            - --host-proc|&\n            - --token=plain-text|' "$dir/lre-worker.yaml" >"$SCEN/k8s-token-arg.yaml"
  sed 's|          env:|&\n            - name: LRE_WORKER_TOKEN\n              valueFrom: {secretKeyRef: {name: lre-worker-token, key: token}}|' \
    "$dir/lre-worker.yaml" >"$SCEN/k8s-token-env.yaml"
  check "$n: a worker token given as --token or in LRE_WORKER_TOKEN fails that check" "" \
    k8s_worker_tokens_refused "$py" "$SCEN/k8s-token-arg.yaml" "$SCEN/k8s-token-env.yaml"
  check "$n: the server config allows no anonymous write and has a token of scope \"worker\"" \
    "$(grep -E '^\s*(anonymous|scope) *=' "$SCEN/k8s-lre-server.toml" | tr -s ' \n' ' ')" k8s_server_auth "$SCEN/k8s-lre-server.toml"
  sed 's/anonymous = "read"/anonymous = "read-write"/' "$SCEN/k8s-lre-server.toml" >"$SCEN/k8s-server-rw.toml"
  grep -v '^\s*anonymous *=' "$SCEN/k8s-lre-server.toml" >"$SCEN/k8s-server-noanon.toml"
  check "$n: anonymous = \"read-write\", or no anonymous line (read-write by default), fails that check" "" \
    k8s_server_auths_refused "$SCEN/k8s-server-rw.toml" "$SCEN/k8s-server-noanon.toml"
}
# k8s_worker_token PYDEPS MANIFEST flags|volume: every Deployment container's token is
# --token-file (flags: and no --token flag, no token env var or envFrom secret), and that
# file lies on a readOnly mount of a Secret volume with mode 0400 (volume).
k8s_worker_token() {
  PYTHONPATH="$1" python3 - "$2" "$3" <<'PYEOF'
import sys, yaml
deps = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "Deployment"]
mode, ok = sys.argv[2], bool(deps)
for d in deps:
    spec = d["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        args = [str(a) for a in c.get("command", []) + c.get("args", [])]
        path = next((a.split("=", 1)[1] for a in args if a.startswith("--token-file=")), None)
        if path is None and "--token-file" in args and args.index("--token-file") + 1 < len(args):
            path = args[args.index("--token-file") + 1]
        if path is None:
            ok = False; continue
        if mode == "flags":
            if any(a == "--token" or a.startswith(("--token=", "--token ")) for a in args):
                ok = False
            if any(e.get("name") in ("LRE_WORKER_TOKEN", "LRE_TOKEN") for e in c.get("env", [])):
                ok = False
            if any("secretRef" in e for e in c.get("envFrom", [])):
                ok = False
        else:
            mounts = [m for m in c.get("volumeMounts", [])
                      if path.startswith(m["mountPath"].rstrip("/") + "/")]
            m = max(mounts, key=lambda m: len(m["mountPath"]), default=None)
            v = vols.get(m["name"], {}).get("secret") if m else None
            if not (m and m.get("readOnly") is True and v and v.get("secretName")):
                ok = False; continue
            item = next((i for i in v.get("items", [])
                         if m["mountPath"].rstrip("/") + "/" + i["path"] == path), None)
            if v.get("items") and item is None:
                ok = False
            if (item or {}).get("mode", v.get("defaultMode")) != 0o400:
                ok = False
sys.exit(0 if ok else 1)
PYEOF
}
# k8s_worker_tokens_refused PYDEPS MANIFEST...: k8s_worker_token ... flags fails on each.
k8s_worker_tokens_refused() {
  local py="$1" f; shift
  for f in "$@"; do ! k8s_worker_token "$py" "$f" flags || return 1; done
}
# k8s_server_auths_refused CONFIG...: k8s_server_auth fails on each.
k8s_server_auths_refused() {
  local f
  for f in "$@"; do ! k8s_server_auth "$f" || return 1; done
}
# k8s_server_auth CONFIG.toml: auth.anonymous is "read" or "none" (absent means read-write)
# and some [[auth.tokens]] entry has scope = "worker".
k8s_server_auth() {
  python3 - "$1" <<'PYEOF'
import sys, tomllib
auth = tomllib.load(open(sys.argv[1], "rb")).get("auth", {})
ok = auth.get("anonymous", "read-write") in ("read", "none") and \
    any(t.get("scope") == "worker" for t in auth.get("tokens", []))
sys.exit(0 if ok else 1)
PYEOF
}
same_pinned_image() {
  local image env
  image="$(grep -oE 'image: [^ ]+@sha256:[0-9a-f]{64}' "$1" | cut -d' ' -f2)"
  env="$(grep -A1 'name: LRE_IMAGE' "$1" | grep -oE 'value: .*' | cut -d' ' -f2)"
  [ -n "$image" ] && [ "$image" = "$env" ]
}

main() {
  e2e_init
  check "preflight: lre, lre-worker, nix, docker-registry, skopeo, umoci, bwrap, bazel" "" \
    test -x "$LRE" -a -x "$LRE_WORKER" -a -n "$(command -v nix-build)" -a -n "$(command -v docker-registry)" \
    -a -n "$(command -v skopeo)" -a -n "$(command -v umoci)" -a -n "$(command -v bwrap)" -a -n "$(command -v "$BAZEL")"
  if prepare; then
    scenario_push && scenario_repro
    scenario_update
    scenario_run
    [ -n "${RUN_WS:-}" ] && scenario_routing
    scenario_errors
  fi
  scenario_kubernetes
  echo "$E2E_PASSED passed, $E2E_FAILED failed"
  [ "$E2E_FAILED" = 0 ]
}

main "$@"
