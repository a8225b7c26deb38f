//! lazyblk: makes microVM sandbox templates usable on every node at once, without
//! copying them first.
//!
//! # Layout
//! - [`cli`]: the command line (DESIGN.md section 7) assembled from the commands'
//!   arguments, and `--config FILE` of the daemon and the store; [`flags`]: the flag
//!   grammar every layer shares (sizes, labels, the token); [`notify`]: readiness for
//!   systemd. Each command's arguments live with the code that runs it, so no module
//!   below `cli` imports it, and none below `commands` imports that.
//! - [`store`]: the artifact store: an HTTP server over a directory, and its client.
//! - [`build`]: make an ext4 image from a directory or a container image and publish it.
//! - [`publish`]: chunk an image, upload what the store lacks, publish the manifest.
//! - [`daemon`]: the node daemon: NBD and FUSE exports over the chunk cache, the
//!   background fill, traces, the HTTP API, the state database.
//! - [`commands`]: the client commands, one file each (status, warm, evict, overlay,
//!   commit, attach, templates, nodes, policy, node-key, keygen, man pages and
//!   completions...), over one typed client per server; its header states the flag
//!   rules and exit codes.
//! - [`http_client`]: the HTTP client of the commands and the daemon; [`auth`]: bearer
//!   tokens on both HTTP servers; [`http_server`]: their accept loop, with header and
//!   idle timeouts.
//! - [`identity`]: a node's key and signed requests; [`trust`]: signed manifests and
//!   the keys a daemon or store trusts.
//! - [`metrics`]: Prometheus counters shared by the daemon and the store.
//! - [`printable`]: strings from outside (leases, errors, labels) made safe to show, in
//!   the CLI's output and the text log.
//!
//! # Data flow
//! `publish` writes chunks and a manifest to the store. A daemon learns templates from
//! the store; a client's read enters through NBD or FUSE, reaches an export in
//! [`daemon::exports`], and reads through `lazyblk-cache` (overlay, local chunk, then a
//! fetch from the template's origins or the store).

mod auth;
mod build;
mod cli;
mod commands;
mod daemon;
mod fdstore;
mod flags;
mod http_client;
mod http_server;
mod identity;
mod metrics;
mod notify;
mod printable;
mod progress;
mod publish;
mod store;
mod trust;

use tracing_subscriber::EnvFilter;

use clap::CommandFactory;

use crate::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = cli::parse();
    let default_level = match cli.command {
        // fuser logs every request it has no handler for (xattrs, ioctls) as a warning;
        // the kernel gets ENOSYS and carries on, so those lines are noise.
        Command::Store(_) | Command::Daemon(_) => "info,fuser=error,rustls=error",
        _ => "warn,fuser=error,rustls=error",
    };
    let filter =
        EnvFilter::try_from_env("LAZYBLK_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match cli.log_format {
        // JSON escapes control characters in strings itself.
        crate::cli::LogFormat::Json => logs.with_writer(std::io::stderr).json().init(),
        // Colour codes only for a person at a terminal, not in a log file or journal.
        crate::cli::LogFormat::Text => {
            let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
            logs.with_ansi(colour)
                .with_writer(printable::LogWriter { colour })
                .init()
        }
    }
    if let Command::Daemon(args) = &cli.command {
        // Before the runtime's threads: they all land in the namespace chosen here.
        if let Err(e) = daemon::mount_namespace::place(args) {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let json = cli.command.json();
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // An error may quote a store, a daemon or a lease: shown without its
            // control characters (the message's own line breaks stay).
            let message = printable::printable_lines(&format!("{e:#}")).into_owned();
            eprintln!("error: {message}");
            if json {
                // A script reading stdout gets the failure typed, not an empty page.
                let failure = commands::output::Failure::of(&e, message);
                if let Err(e) = commands::output::print_json(&failure) {
                    eprintln!("error: printing the failure as JSON: {e}");
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Store(args) => store::run(args).await,
        Command::Daemon(args) => daemon::run(*args).await,
        Command::Publish(args) => publish::run(args).await,
        Command::Build(args) => build::run(args).await,
        Command::Templates(args) => commands::templates::run(args).await,
        Command::Status(args) => commands::status::run(args).await,
        Command::Warm(args) => commands::warm::run(args).await,
        Command::Unwarm(args) => commands::unwarm::run(args).await,
        Command::Policy(cmd) => commands::policy::run(cmd).await,
        Command::Completions(args) => commands::completions::run(args, Cli::command()),
        Command::Manpages(args) => commands::manpages::run(args, Cli::command()),
        Command::Evict(args) => commands::evict::run(args).await,
        Command::Overlay(cmd) => commands::overlay::run(cmd).await,
        Command::Commit(args) => commands::commit::run(args).await,
        Command::Resize(args) => commands::resize::run(args).await,
        Command::Attach(args) => commands::attach::run(args).await,
        Command::Detach(args) => commands::detach::run(args).await,
        Command::Delete(args) => commands::delete::run(args).await,
        Command::Gc(args) => commands::gc::run(args).await,
        Command::Scrub(args) => commands::scrub::run(args).await,
        Command::Nodes(args) => commands::nodes::run(args).await,
        Command::NodeKey(args) => commands::node_key::run(args),
        Command::Keygen(args) => commands::keygen::run(args),
    }
}
