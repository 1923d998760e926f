# The logic-free core of the lre flake module: turns the module's options into the
# `lre generate` command line and the devShell installation script. Plain Nix, no
# nixpkgs and no module system, so it is evaluated and tested with `nix eval` alone.
#
# Arguments mirror the flake module's options; `lre` is the lre package (anything whose
# "${lre}/bin/lre" runs it).
{ lre
, Env ? [ ]
, prefix ? "lre"
, cc ? null
, java ? null
, endpoint ? null
, instanceName ? null
, readOnly ? false
, image ? null
, bazelVersion ? null
}:
let
  inherit (builtins) concatLists concatMap concatStringsSep replaceStrings toString;
  quote = s: "'" + replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
  opt = flag: v: if v == null then [ ] else [ flag (toString v) ];
  # A package's own Env (passthru.Env or meta.Env) travels as --env, so the shellHook needs
  # no evaluation; a package without one is passed as its store path.
  # nixpkgs' JDKs carry their JAVA_HOME as `home`.
  envOf = p: p.passthru.Env or p.meta.Env
    or (if p ? home then [ "JAVA_HOME=${p.home}" "PATH=${p}/bin" ] else null);
  pkgArgs = flag: p:
    if p == null then [ ]
    else if envOf p != null then concatMap (e: [ "--env" e ]) (envOf p)
    else [ flag "${p}" ];
  args = concatLists [
    (concatMap (e: [ "--env" e ]) Env)
    (pkgArgs "--cc" cc)
    (pkgArgs "--java" java)
    (opt "--prefix" prefix)
    (opt "--endpoint" endpoint)
    (opt "--instance-name" instanceName)
    (opt "--image" image)
    (opt "--bazel-version" bazelVersion)
    (if readOnly then [ "--read-only" ] else [ ])
  ];
in
{
  inherit args;
  # For a devShell's shellHook. It never fails the shell: `lre generate` itself leaves an
  # unchanged file untouched and refuses to overwrite one edited by hand.
  installationScript = ''
    # lre: keep .bazelrc.lre in step with the toolchain of this shell.
    if lre_top=$(git rev-parse --show-toplevel 2>/dev/null); then
      ${lre}/bin/lre generate --workspace "$lre_top" ${concatStringsSep " " (map quote args)} \
        || echo "lre: .bazelrc.lre was not updated; see the message above" >&2
    else
      echo "lre: not inside a git repository, so .bazelrc.lre was not generated" >&2
    fi
    unset lre_top
  '';
}
