//! Config files for the long-running commands (`lazyblk daemon --config FILE`,
//! `lazyblk store --config FILE`): TOML whose keys are the command's long flags. The
//! file's settings are read first and become flags placed before the command line's,
//! so a flag on the command line wins; a key whose flag has an environment variable
//! that is set yields to the variable. Precedence: flag, environment, file, default.
//!
//! `--print-config` shows what is in effect, as a file `--config` reads back, each
//! value with its source.
//!
//! Values: a string, an integer or a float is the flag's value as written on the
//! command line (`cache-size = "20G"`, `nbd-max-connections = 256`); `true` turns on a
//! switch (`false` leaves it off). An unknown key, a table, a list, or a value of the
//! wrong kind is an error naming the file and the key. A flag on the command line
//! also overrides file keys it excludes (`--backend` over the file's `root`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

use super::Cli;

/// The commands that take `--config`.
const CONFIGURABLE: [&str; 2] = ["daemon", "store"];
/// Flags that are about the config file itself, or clap's own.
const NOT_SETTINGS: [&str; 4] = ["config", "print-config", "help", "version"];

/// Parses the command line, reading `--config` first where the command takes one. Exits
/// the process (as clap does) on `--help`, on a usage error, and after `--print-config`.
pub fn parse() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    match parse_from(args) {
        Ok((cli, None)) => cli,
        Ok((_, Some(printed))) => {
            print!("{printed}");
            std::process::exit(0);
        }
        Err(Failure::Clap(e)) => e.exit(),
        Err(Failure::Config(e)) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

enum Failure {
    Clap(clap::Error),
    Config(anyhow::Error),
}

/// The parsed command line and, with `--print-config`, the text to print.
fn parse_from(args: Vec<OsString>) -> Result<(Cli, Option<String>), Failure> {
    let Some((sub_at, sub)) = subcommand(&args) else {
        return Cli::try_parse_from(args)
            .map(|c| (c, None))
            .map_err(Failure::Clap);
    };
    let mut command = Cli::command();
    command.build();
    let sub_command = command
        .find_subcommand(&sub)
        .expect("a configurable subcommand")
        .clone();
    let rest = &args[sub_at + 1..];
    let config = config_path(rest);
    // Flags anywhere on the command line (a global one may come before the command).
    let given = flags_given(&args[1..]);
    let (file_args, file_keys) = match &config {
        Some(path) => from_file(path, &sub_command, &given).map_err(Failure::Config)?,
        None => (Vec::new(), BTreeSet::new()),
    };
    let mut merged: Vec<OsString> = args[..=sub_at].to_vec();
    merged.extend(file_args);
    merged.extend(rest.iter().cloned());
    // Each flag may appear twice now (file, then command line): the last one wins.
    let command = Cli::command().mut_subcommand(&sub, |c| c.args_override_self(true));
    let matches = command
        .try_get_matches_from(merged)
        .map_err(Failure::Clap)?;
    let cli = Cli::from_arg_matches(&matches).map_err(Failure::Clap)?;
    let (_, sub_matches) = matches.subcommand().expect("a subcommand");
    if sub_matches.get_flag("print_config") {
        let printed = print(
            &sub_command,
            sub_matches,
            &given,
            &file_keys,
            config.as_deref(),
        );
        return Ok((cli, Some(printed)));
    }
    Ok((cli, None))
}

/// Where `daemon` or `store` is in `args`, if the command is one of them.
fn subcommand(args: &[OsString]) -> Option<(usize, String)> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--log-format" {
            i += 2;
            continue;
        }
        if a.starts_with('-') {
            i += 1;
            continue;
        }
        return CONFIGURABLE
            .contains(&a.as_ref())
            .then(|| (i, a.into_owned()));
    }
    None
}

/// The value of `--config` among the command's arguments.
fn config_path(rest: &[OsString]) -> Option<std::path::PathBuf> {
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(Into::into);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(v.into());
        }
    }
    None
}

/// Long flags written on the command line.
fn flags_given(rest: &[OsString]) -> BTreeSet<String> {
    rest.iter()
        .filter_map(|a| a.to_str())
        .take_while(|a| *a != "--")
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect()
}

/// The file's settings as flags, and the keys it set.
fn from_file(
    path: &Path,
    command: &clap::Command,
    given: &BTreeSet<String>,
) -> anyhow::Result<(Vec<OsString>, BTreeSet<String>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    // The parser's own message quotes the offending line, which may hold a token: the
    // error names the line and column and the reason only.
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|span| bytecount_lines(&text.as_bytes()[..span.start.min(text.len())]));
        anyhow::anyhow!(
            "parsing the config file {}{}: {}",
            path.display(),
            line.map(|l| format!(", line {l}")).unwrap_or_default(),
            e.message()
        )
    })?;
    let mut out = Vec::new();
    let mut keys = BTreeSet::new();
    for (key, value) in table {
        let at = || format!("{}: key {key:?}", path.display());
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|_| !NOT_SETTINGS.contains(&key.as_str()))
        else {
            bail!(
                "{}: not a flag of lazyblk {} (see lazyblk {} --help)",
                at(),
                command.get_name(),
                command.get_name()
            );
        };
        if let Some(env) = arg.get_env() {
            if std::env::var_os(env).is_some() {
                tracing::debug!(key, "the environment's value wins over the config file's");
                continue;
            }
        }
        // The command line wins: the flag itself, or one that excludes it (`--backend`
        // given, the file's `root` is left out).
        let on_command_line = |a: &clap::Arg| a.get_long().is_some_and(|l| given.contains(l));
        // Conflicts are declared on one side of the pair; look at both.
        let excluded = command
            .get_arg_conflicts_with(arg)
            .into_iter()
            .any(on_command_line)
            || command
                .get_arguments()
                .filter(|a| on_command_line(a))
                .any(|a| {
                    command
                        .get_arg_conflicts_with(a)
                        .iter()
                        .any(|c| c.get_id() == arg.get_id())
                });
        if given.contains(key.as_str()) || excluded {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        // No flag of these commands takes several values.
        if let toml::Value::Array(_) = value {
            bail!(
                "{}: a list is not a flag's value (each flag takes one)",
                at()
            );
        }
        {
            let v = value;
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if !takes_value => {
                    if b {
                        out.push(OsString::from(format!("--{key}")));
                    }
                    keys.insert(key);
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!(
                    "{}: a {} is not a flag's value (a string, a number or a boolean)",
                    at(),
                    other.type_str()
                ),
            };
            if !takes_value {
                bail!("{}: a switch takes true or false, not {text:?}", at());
            }
            out.push(OsString::from(format!("--{key}={text}")));
        }
        keys.insert(key);
    }
    Ok((out, keys))
}

/// The line number (from 1) that follows `before`, the bytes of a file before a place.
fn bytecount_lines(before: &[u8]) -> usize {
    before.iter().filter(|b| **b == b'\n').count() + 1
}

/// The settings in effect as a config file, each line with its source.
fn print(
    command: &clap::Command,
    matches: &ArgMatches,
    given: &BTreeSet<String>,
    from_file: &BTreeSet<String>,
    config: Option<&Path>,
) -> String {
    let mut out = String::new();
    if let Some(path) = config {
        out.push_str(&format!(
            "# lazyblk {} --config {}\n",
            command.get_name(),
            path.display()
        ));
    }
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_SETTINGS.contains(&long) {
            continue;
        }
        let id = arg.get_id().as_str();
        let source = match matches.value_source(id) {
            None => {
                out.push_str(&format!("# {long} is not set\n"));
                continue;
            }
            Some(ValueSource::DefaultValue) => "default",
            Some(ValueSource::EnvVariable) => "environment",
            Some(_) if given.contains(long) => "flag",
            Some(_) if from_file.contains(long) => "config file",
            Some(_) => "flag",
        };
        if long.ends_with("token") {
            // Not printed, and commented out: read back, the file keeps its own.
            out.push_str(&format!("# {long} = (hidden)  # {source}\n"));
            continue;
        }
        let value = if !arg.get_action().takes_values() {
            toml::Value::Boolean(matches.get_flag(id)).to_string()
        } else {
            let raw: Vec<String> = matches
                .get_raw(id)
                .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            match raw.as_slice() {
                [one] => toml::Value::String(one.clone()).to_string(),
                many => toml::Value::Array(many.iter().cloned().map(toml::Value::String).collect())
                    .to_string(),
            }
        };
        out.push_str(&format!("{long} = {value}  # {source}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The long flags of a command that a config file may set.
    fn settings(name: &str) -> BTreeSet<String> {
        let mut command = Cli::command();
        command.build();
        command
            .find_subcommand(name)
            .unwrap()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !NOT_SETTINGS.contains(l))
            .map(str::to_string)
            .collect()
    }

    /// The keys of a packaged config file, set or commented out (`# key = value`).
    fn keys_of(file: &str) -> BTreeSet<String> {
        file.lines()
            .filter_map(|l| {
                let l = l.trim_start_matches('#').trim();
                let (key, _) = l.split_once(" = ")?;
                key.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-')
                    .then(|| key.to_string())
            })
            .collect()
    }

    #[test]
    fn the_packaged_config_files_name_every_flag() {
        for (name, file) in [
            ("daemon", include_str!("../../packaging/daemon.toml")),
            ("store", include_str!("../../packaging/store.toml")),
        ] {
            assert_eq!(keys_of(file), settings(name), "packaging/{name}.toml");
        }
    }

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_flag_on_the_command_line_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.toml");
        std::fs::write(
            &path,
            "cache = \"/from/file\"\nnbd-max-connections = 7\nlisten = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let (cli, printed) = parse_from(os(&[
            "lazyblk",
            "daemon",
            "--config",
            p,
            "--listen",
            "127.0.0.1:2",
        ]))
        .ok()
        .unwrap();
        assert!(printed.is_none());
        let crate::cli::Command::Daemon(d) = cli.command else {
            panic!("not the daemon")
        };
        assert_eq!(d.cache, Path::new("/from/file"));
        assert_eq!(d.nbd_max_connections, 7);
        assert_eq!(d.listen, "127.0.0.1:2");
    }

    #[test]
    fn bad_files_are_refused_with_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        for (text, expect) in [
            ("no-such-flag = 1\n", "not a flag of lazyblk daemon"),
            ("cache = { a = 1 }\n", "a table is not a flag's value"),
            ("cache = [\n", "parsing the config file"),
            ("config = \"x\"\n", "not a flag"),
            ("peers = [\"a\", \"b\"]\n", "a list is not a flag's value"),
        ] {
            let path = dir.path().join("bad.toml");
            std::fs::write(&path, text).unwrap();
            let Err(Failure::Config(e)) = parse_from(os(&[
                "lazyblk",
                "daemon",
                "--config",
                path.to_str().unwrap(),
            ])) else {
                panic!("{text:?} was accepted")
            };
            let e = format!("{e:#}");
            assert!(
                e.contains(expect) && e.contains("bad.toml"),
                "{text:?}: {e}"
            );
        }
        let Err(Failure::Config(e)) =
            parse_from(os(&["lazyblk", "store", "--config", "/no/such/file.toml"]))
        else {
            panic!("a missing file was accepted")
        };
        assert!(format!("{e:#}").contains("/no/such/file.toml"));
    }
}
