# The lre flake-parts module (flakeModules.default of lre's flake). Per system:
#
#   lre.enable = true;
#   lre.cc = pkgs.clang;          # or any package with passthru.Env
#   lre.endpoint = "grpc://127.0.0.1:8980";
#   devShells.default = pkgs.mkShell { shellHook = config.lre.installationScript; };
#
# It only declares options and passes them to ./lre-core.nix; `lre` does the work.
localFlake:
{ lib, flake-parts-lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options.perSystem = flake-parts-lib.mkPerSystemOption ({ config, system, ... }: {
    options.lre = {
      enable = lib.mkEnableOption "Local Remote Execution (.bazelrc.lre from Nix toolchains)";
      package = mkOption {
        type = types.package;
        default = localFlake.packages.${system}.lre;
        defaultText = lib.literalExpression "lre.packages.\${system}.lre";
        description = "The lre package whose `lre generate` the installation script runs.";
      };
      Env = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "PATH=/nix/store/…-coreutils/bin" ];
        description = "NAME=VALUE entries of the toolchain environment, pinned in .bazelrc.lre.";
      };
      prefix = mkOption {
        type = types.nullOr types.str;
        default = "lre";
        description = "Write `build:<prefix>` lines (used with --config=<prefix>); null for plain `build`.";
      };
      cc = mkOption {
        type = types.nullOr types.package;
        default = null;
        description = "The C/C++ toolchain; its passthru.Env (or meta.Env) is used when it has one.";
      };
      java = mkOption {
        type = types.nullOr types.package;
        default = null;
        description = "The Java runtime; JAVA_HOME is taken from its Env, else its store path.";
      };
      endpoint = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "grpc://127.0.0.1:8980";
        description = "The REAPI server .bazelrc.lre points Bazel at.";
      };
      instanceName = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The REAPI instance name.";
      };
      image = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "registry.example.com/lre/worker@sha256:…";
        description = "The worker image `lre image push` printed; pinned as the platform's container-image.";
      };
      readOnly = mkOption {
        type = types.bool;
        default = false;
        description = "Read the cache but never upload (contributors of an open project).";
      };
      installationScript = mkOption {
        type = types.str;
        readOnly = true;
        description = "Shell code for a devShell's shellHook that regenerates .bazelrc.lre.";
      };
    };
    config.lre.installationScript = lib.optionalString config.lre.enable
      (import ./lre-core.nix {
        lre = config.lre.package;
        inherit (config.lre) Env prefix cc java endpoint instanceName readOnly image;
      }).installationScript;
  });
}
