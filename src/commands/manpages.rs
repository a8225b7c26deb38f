//! `lazyblk manpages DIR`: man pages made from the command line itself (clap_mangen), so
//! they never drift from `--help`: one page for `lazyblk` and one per command
//! (`lazyblk-daemon.1`, `lazyblk-overlay-create.1`, ...). The Debian package ships them
//! with the completions (`scripts/package.sh`). `main` hands in the command line's
//! definition, so this file does not depend on `crate::cli`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct ManpagesArgs {
    /// Where to write the pages (made if missing).
    pub dir: PathBuf,
}

/// Writes the pages of `command` (the whole command line) into the directory.
pub fn run(args: ManpagesArgs, mut command: clap::Command) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("making {}", args.dir.display()))?;
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
