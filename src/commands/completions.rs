//! `lazyblk completions SHELL`: a shell completion script (clap_complete), made from the
//! command line itself so it never drifts from `--help`. `main` hands in the command
//! line's definition, so this file does not depend on `crate::cli`.

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Prints the completion script of `command` (the whole command line) for the shell.
pub fn run(args: CompletionsArgs, mut command: clap::Command) -> anyhow::Result<()> {
    clap_complete::generate(args.shell, &mut command, "lazyblk", &mut std::io::stdout());
    Ok(())
}
