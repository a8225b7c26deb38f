//! The command line: one subcommand per row of DESIGN.md section 7, assembled here
//! (the [`Cli`], its [`Command`] enum and the global flags) from arguments that live
//! next to the code that runs them:
//! - the client commands' in [`crate::commands`], one file each with its `run`
//!   (including `node-key`, `keygen`, `completions`, `manpages`);
//! - the servers' in `crate::store::args` and `crate::daemon::args`, the pipelines' in
//!   `crate::publish::args` and `crate::build::args`;
//! - the flag grammar they share (sizes, labels, the token) in `crate::flags`.
//!
//! Nothing below this module imports it. [`config`] reads `--config FILE` of the
//! daemon and the store into the same parse; `main.rs` maps each subcommand onto its
//! `run`.

use clap::{Parser, Subcommand};

pub mod config;

use crate::build::BuildArgs;
use crate::commands::attach::AttachArgs;
use crate::commands::commit::CommitArgs;
use crate::commands::completions::CompletionsArgs;
use crate::commands::delete::DeleteArgs;
use crate::commands::detach::DetachArgs;
use crate::commands::evict::EvictArgs;
use crate::commands::gc::GcArgs;
use crate::commands::keygen::KeygenArgs;
use crate::commands::manpages::ManpagesArgs;
use crate::commands::node_key::NodeKeyArgs;
use crate::commands::nodes::NodesArgs;
use crate::commands::overlay::OverlayCommand;
use crate::commands::policy::PolicyCommand;
use crate::commands::resize::ResizeArgs;
use crate::commands::scrub::ScrubArgs;
use crate::commands::status::StatusArgs;
use crate::commands::templates::TemplatesArgs;
use crate::commands::unwarm::UnwarmArgs;
use crate::commands::warm::WarmArgs;
use crate::daemon::args::DaemonArgs;
use crate::publish::PublishArgs;
use crate::store::args::StoreArgs;

pub use config::parse;

/// lazyblk: microVM sandbox templates as lazily fetched, content-addressed block devices.
///
/// A template (an ext4 image) is published once to a store as a manifest plus
/// sha256-named chunks. Every node runs `lazyblk daemon`, which serves each template
/// over NBD and as a FUSE file and fetches chunks on demand.
#[derive(Parser, Debug)]
#[command(name = "lazyblk", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text (colour only on a terminal) or as one JSON object per line,
    /// for a log collector.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// How log lines are written (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the artifact store: manifests, chunks and traces over HTTP.
    Store(StoreArgs),
    /// Run the node daemon: NBD and FUSE exports of every template, fetched lazily.
    Daemon(Box<DaemonArgs>),
    /// Chunk an image, upload the chunks the store lacks, publish its manifest.
    Publish(PublishArgs),
    /// Make an ext4 image from a directory or a container image (OCI layout, docker
    /// save) and publish it.
    Build(BuildArgs),
    /// List the store's templates and their durability.
    Templates(TemplatesArgs),
    /// Show replica phase, progress, bytes by source and exports in use on a node.
    Status(StatusArgs),
    /// Fill a node's replica of a template to READY in the background.
    Warm(WarmArgs),
    /// Drop a node's replica of a template (its local chunks).
    Evict(EvictArgs),
    /// Create or delete a sandbox's copy-on-write overlay.
    #[command(subcommand)]
    Overlay(OverlayCommand),
    /// Commit a sandbox's overlay into a new template.
    Commit(CommitArgs),
    /// Grow a template into a new template (e2fsck and resize2fs on an overlay, then a commit).
    Resize(ResizeArgs),
    /// Attach an export of a node as a kernel block device (/dev/nbdN, or /dev/ublkbN with --kind ublk); prints the device.
    Attach(AttachArgs),
    /// Disconnect a kernel block device (/dev/nbdN or /dev/ublkbN) attached with `lazyblk attach`.
    Detach(DetachArgs),
    /// Remove a template (manifest and trace) from the store; its chunks stay until gc.
    Delete(DeleteArgs),
    /// Delete the store's chunks that no manifest references.
    Gc(GcArgs),
    /// Verify every chunk a node caches (or a store holds) against its sha256; drop the
    /// bad ones (a node fetches them again on demand; a store gets them back from the
    /// next publish or upload of that content).
    Scrub(ScrubArgs),
    /// List the live nodes of a store's fleet (their leases, replicas, cache).
    Nodes(NodesArgs),
    /// Print this node's id and public key (made on first use, kept in the cache
    /// directory as node.key): what a store's --member-keys file lists.
    NodeKey(NodeKeyArgs),
    /// Make an ed25519 key for signing templates (`publish`/`build --signing-key FILE`)
    /// and print its public key, the line a `--trusted-keys` file lists.
    Keygen(KeygenArgs),
    /// Remove a fleet wish recorded by `warm --all-nodes|--nodes|--min-replicas`; the
    /// nodes unpin the template at their next heartbeat.
    Unwarm(UnwarmArgs),
    /// The store's label policy: minimum versions; templates below them are STALE.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `lazyblk completions bash > /etc/bash_completion.d/lazyblk`.
    Completions(CompletionsArgs),
    /// Write man pages for lazyblk and each of its commands into a directory
    /// (lazyblk.1, lazyblk-daemon.1, ...).
    Manpages(ManpagesArgs),
}

impl Command {
    /// Whether the command was asked for `--json`: then a failure is printed on stdout
    /// as JSON too (`commands::output::Failure`), besides the `error:` line on stderr.
    pub fn json(&self) -> bool {
        match self {
            Command::Store(_)
            | Command::Daemon(_)
            | Command::Completions(_)
            | Command::Manpages(_) => false,
            Command::Publish(a) => a.json,
            Command::Build(a) => a.json,
            Command::Templates(a) => a.json,
            Command::Status(a) => a.json,
            Command::Warm(a) => a.json,
            Command::Evict(a) => a.json,
            Command::Overlay(OverlayCommand::Create(a)) => a.json,
            Command::Overlay(OverlayCommand::Delete(a)) => a.json,
            Command::Overlay(OverlayCommand::List(a)) => a.json,
            Command::Commit(a) => a.json,
            Command::Resize(a) => a.json,
            Command::Attach(a) => a.json,
            Command::Detach(a) => a.json,
            Command::Delete(a) => a.json,
            Command::Gc(a) => a.json,
            Command::Scrub(a) => a.json,
            Command::Nodes(a) => a.json,
            Command::NodeKey(a) => a.json,
            Command::Keygen(a) => a.json,
            Command::Unwarm(a) => a.json,
            Command::Policy(PolicyCommand::Set(a)) => a.json,
            Command::Policy(PolicyCommand::Unset(a)) => a.json,
            Command::Policy(PolicyCommand::List(a)) => a.json,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument read from the environment hides its value in `--help` (they are
    /// the tokens); tests/cli_hygiene.rs checks the pages themselves.
    #[test]
    fn environment_values_are_hidden() {
        use clap::CommandFactory;
        let mut todo = vec![Cli::command()];
        let mut checked = 0;
        while let Some(mut command) = todo.pop() {
            command.build();
            for arg in command.get_arguments() {
                if arg.get_env().is_some() {
                    assert!(
                        arg.is_hide_env_values_set(),
                        "{} --{}",
                        command.get_name(),
                        arg.get_id()
                    );
                    checked += 1;
                }
            }
            todo.extend(command.get_subcommands().cloned());
        }
        assert!(checked >= 14, "{checked}");
    }
}
