{
  description = "lre: Local Remote Execution for Bazel, driven by Nix";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    flake-parts.url = "github:hercules-ci/flake-parts";
    crane.url = "github:ipetkov/crane";
  };

  outputs = inputs@{ self, flake-parts, crane, ... }:
    flake-parts.lib.mkFlake { inherit inputs; } ({ flake-parts-lib, ... }:
      let
        # The module closes over this flake, so lre.package defaults to our own lre.
        flakeModule = flake-parts-lib.importApply ./modules/flake-module.nix self;
      in
      {
        systems = [ "x86_64-linux" "aarch64-linux" ];
        imports = [ flakeModule ];
        flake.flakeModules.default = flakeModule;

        perSystem = { config, pkgs, lib, self', ... }:
          let
            craneLib = crane.mkLib pkgs;
            # The Cargo sources, plus what the crates compile in: the templates, the static
            # Bazel module and the worker protocol's .proto (protox needs no protoc).
            src = lib.cleanSourceWith {
              src = ./.;
              filter = path: type:
                craneLib.filterCargoSources path type
                || builtins.match ".*/(templates|bazel)/.*" path != null
                || lib.hasSuffix ".proto" path;
            };
            common = {
              inherit src;
              pname = "lre";
              version = "0.1.0";
              strictDeps = true;
              # The tests need Bazel, Nix, bubblewrap and loopback servers: scripts/test
              # runs them outside the Nix sandbox.
              doCheck = false;
            };
            cargoArtifacts = craneLib.buildDepsOnly common;
            crate = name: craneLib.buildPackage (common // {
              inherit cargoArtifacts;
              pname = name;
              cargoExtraArgs = "--locked -p ${name}";
            });
          in
          {
            packages = {
              lre = crate "lre-cli";
              lre-server = crate "lre-server";
              lre-worker = crate "lre-worker";
              default = self'.packages.lre;
            };

            # Our own devShell uses our own module: nixpkgs' clang and JDK, pinned.
            lre = {
              enable = true;
              cc = pkgs.clang;
              java = pkgs.jdk17_headless;
              Env = [
                "PATH=${lib.makeBinPath [ pkgs.clang pkgs.clang.bintools pkgs.coreutils pkgs.bash ]}"
              ];
            };

            devShells.default = pkgs.mkShell {
              inputsFrom = [ self'.packages.lre ];
              packages = [ self'.packages.lre pkgs.bazel_7 pkgs.cargo pkgs.rustc ];
              shellHook = config.lre.installationScript;
            };
          };
      });
}
