//! The library behind the `lre` command: toolchain resolution with Nix, compiler probing,
//! rendering of `.bazelrc.lre` and `@local-remote-execution`, execution-log comparison,
//! and the checks of `lre doctor`.

pub mod bazel;
pub mod command;
pub mod doctor;
pub mod env;
pub mod error;
pub mod execlog;
pub mod explain;
pub mod generate;
pub mod image;
pub mod nix;
pub mod probe;
pub mod provenance;
pub mod publish;
pub mod registry;
pub mod render;
pub mod status;
pub mod toolchain;
pub mod up;
