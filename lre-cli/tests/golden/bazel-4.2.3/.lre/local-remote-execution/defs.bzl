"""WORKSPACE macro for @local-remote-execution (Bazel before 7, or without Bzlmod).

In WORKSPACE:

    local_repository(
        name = "local-remote-execution",
        path = ".lre/local-remote-execution",
    )
    load("@local-remote-execution//:defs.bzl", "lre_register")
    lre_register()

This registers what .bazelrc.lre otherwise passes as flags, for builds without it.
"""

def lre_register(cc = True, java = False):
    native.register_execution_platforms("@local-remote-execution//generated/config:platform")
    if cc:
        native.register_toolchains("@local-remote-execution//generated/cc:cc-toolchain")
    if java:
        native.register_toolchains("@local-remote-execution//generated/java:runtime-toolchain")
# lre-checksum: sha256:1f6f99ae929634e38115fc16816e46384cea3dba74e46cdbf9013c4633931dce
