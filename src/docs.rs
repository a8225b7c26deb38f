//! Documentation generated from the command line itself, so it never drifts from
//! `--help`: shell completions (clap_complete) and man pages (clap_mangen), one page for
//! `lazyblk` and one per command (`lazyblk-daemon.1`, `lazyblk-overlay-create.1`, ...).
//! The Debian package ships both (`scripts/package.sh`).

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs, ManpagesArgs};

pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut command = Cli::command();
    clap_complete::generate(args.shell, &mut command, "lazyblk", &mut std::io::stdout());
    Ok(())
}

pub fn manpages(args: ManpagesArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("making {}", args.dir.display()))?;
    let mut command = Cli::command();
    command.build();
    let written = write_pages(&command, "lazyblk", &args.dir)?;
    eprintln!("manpages: {written} pages in {}", args.dir.display());
    Ok(())
}

/// Writes the page of `command` (named `name`) and of each of its subcommands.
fn write_pages(command: &clap::Command, name: &str, dir: &Path) -> anyhow::Result<usize> {
    let page = command.clone().name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .with_context(|| format!("rendering {}", path.display()))?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    let mut written = 1;
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        written += write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(written)
}
