//! The client commands: one file per command of DESIGN.md section 7, each owning its
//! arguments (a clap `Args` struct) and its `run` function, over one typed client per
//! server: [`node_client::NodeClient`] for a daemon, `crate::store::client::StoreClient`
//! for a store. Both parse answers into the servers' own request and response types,
//! so a field renamed on a server fails the build, not a run. The local tools
//! (`node-key`, `keygen`, `completions`, `manpages`) are here too. The servers (`store`,
//! `daemon`) and the pipelines (`publish`, `build`) keep their arguments in their own
//! modules (`crate::daemon::args`, ...); `crate::cli` assembles them all into one
//! command line and `main.rs` maps each subcommand onto its `run`. Nothing here imports
//! `crate::cli` (`completions` and `manpages` are handed its definition), and no
//! server or pipeline imports this module.
//!
//! # Flag rules (every command here follows them; `tests/commands_json.rs` checks)
//! - **One name per secret.** A bearer token is `--token` (a store's or a daemon's
//!   write token, whichever server the command talks to), or the environment variable
//!   `LAZYBLK_WRITE_TOKEN`; `--token-file PATH` reads it from a file. Its value is
//!   never shown: not by `--help` (`hide_env_values`), not in an error. The old name
//!   `--write-token` of `delete` and `gc` stays as a hidden alias.
//! - **`--json` on every command that prints** a result: the server's own answer
//!   type, pretty-printed, on stdout; progress and warnings go to stderr. Without it
//!   the output is for a person and may change. A failure with `--json` prints
//!   [`output::Failure`] on stdout (`{"error", "status"}`: the message of the `error:`
//!   line on stderr, and the HTTP status the server refused with, `null` when no server
//!   answered); servers refuse with `crate::http_server::ErrorAnswer`, one type for
//!   both servers and both clients.
//! - **`--node URL` and `--store URL` are the only target selectors**: `--node` names a
//!   daemon (default [`args::DEFAULT_NODE`]), `--store` a store server (default
//!   [`crate::flags::DEFAULT_STORE`]; `URL,URL` for several servers over one bucket). A
//!   command that can talk to either (`scrub`, `warm`, `status`) talks to the store
//!   only when `--store` is given.
//! - **Exit codes**: 0 done; 1 failed (the server refused, was unreachable, or a fill
//!   FAILED; the message on stderr says which); 2 usage (a flag or argument clap
//!   refused; nothing was sent).
//!
//! # Layout
//! [`args`]: what several commands share (`--node`; the token, sizes and labels are
//! `crate::flags`, shared with the servers and pipelines);
//! [`output`]: tables, byte units and the one JSON printer; [`node_client`]: the
//! daemon's typed client; then one file per command.

pub mod args;
pub mod node_client;
pub mod output;

pub mod attach;
pub mod commit;
pub mod completions;
pub mod delete;
pub mod detach;
pub mod evict;
pub mod gc;
pub mod keygen;
pub mod manpages;
pub mod node_key;
pub mod nodes;
pub mod overlay;
pub mod policy;
pub mod resize;
pub mod scrub;
pub mod status;
pub mod status_fleet;
pub mod templates;
pub mod unwarm;
pub mod warm;
