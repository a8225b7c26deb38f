//! The command reference, read from the real binary's `-h` (clap's summary help): every
//! command, its usage line, its arguments and its flags, rendered as Markdown; and the
//! same read back from a rendered page, to name what is missing on either side.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Flags every command takes (clap's `global` and built-in ones): documented once, in
/// the reference's conventions, not in each command's table.
pub const GLOBAL_FLAGS: [&str; 3] = ["--log-format", "--help", "--version"];

/// One command as `-h` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandHelp {
    /// `["overlay", "create"]` for `lazyblk overlay create`.
    pub path: Vec<String>,
    pub about: String,
    pub usage: String,
    /// Positional arguments: (`<TEMPLATE>`, description).
    pub arguments: Vec<(String, String)>,
    /// Flags but the global ones: (`-t, --template <TEMPLATE>`, description).
    pub options: Vec<(String, String)>,
    /// Subcommands, for a command that only groups others (`overlay`, `policy`).
    pub subcommands: Vec<String>,
}

impl CommandHelp {
    pub fn name(&self) -> String {
        format!("lazyblk {}", self.path.join(" "))
    }

    /// The long flag names (`--template`) of its table.
    pub fn flag_names(&self) -> BTreeSet<String> {
        self.options
            .iter()
            .filter_map(|(spec, _)| long_name(spec))
            .collect()
    }
}

/// `--template` from `-t, --template <TEMPLATE>`; a short-only flag keeps its `-t`.
pub fn long_name(spec: &str) -> Option<String> {
    let words: Vec<&str> = spec.split_whitespace().collect();
    words
        .iter()
        .find(|w| w.starts_with("--"))
        .or_else(|| words.iter().find(|w| w.starts_with('-')))
        .map(|w| w.trim_end_matches(',').to_string())
}

/// Runs `bin ARGS -h` with a clean environment (a variable such as LAZYBLK_SIGNING_KEY
/// would otherwise show its value in `[env: ...]`) and returns its output.
pub fn help_text(bin: &Path, args: &[&str]) -> String {
    let output = Command::new(bin)
        .args(args)
        .arg("-h")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?} -h: {e}", bin.display()));
    assert!(
        output.status.success(),
        "{} {args:?} -h failed: {}",
        bin.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("-h prints UTF-8")
}

/// The sections of a `-h` output: its first paragraph (the about) and, by title
/// (`Usage`, `Commands`, `Arguments`, `Options`), their lines.
fn sections(text: &str) -> (String, BTreeMap<String, Vec<String>>) {
    let mut about = String::new();
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Usage: ") {
            map.insert("Usage".into(), vec![rest.trim().to_string()]);
            current = None;
            continue;
        }
        if !line.starts_with(' ') && line.ends_with(':') && !line.contains(' ') {
            current = Some(line.trim_end_matches(':').to_string());
            map.entry(line.trim_end_matches(':').to_string())
                .or_default();
            continue;
        }
        if !line.starts_with(' ') && !line.trim().is_empty() {
            // Unindented text that is not a section title (an after-help paragraph)
            // ends the section: clap indents every entry.
            current = None;
        }
        match &current {
            Some(title) => map.entry(title.clone()).or_default().push(line.to_string()),
            None if map.is_empty() && !line.trim().is_empty() && about.is_empty() => {
                about = line.trim().to_string()
            }
            None => {}
        }
    }
    (about, map)
}

/// The entries of an `Arguments`, `Options` or `Commands` section: (spec,
/// description). An entry starts at an indentation under 10 columns; its description
/// follows after two spaces, or on the next lines, indented 10 (clap's next-line help).
fn entries(lines: &[String]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let body = line.trim();
        if indent < 10 {
            let (spec, desc) = match body.find("  ") {
                Some(at) => (body[..at].trim(), body[at..].trim()),
                None => (body, ""),
            };
            out.push((spec.to_string(), desc.to_string()));
        } else if let Some(last) = out.last_mut() {
            if !last.1.is_empty() {
                last.1.push(' ');
            }
            last.1.push_str(body);
        }
    }
    out
}

/// Every command of the binary, in `--help`'s order, subcommands after their group.
pub fn from_binary(bin: &Path) -> Vec<CommandHelp> {
    let (_, top) = sections(&help_text(bin, &[]));
    let names: Vec<String> = entries(top.get("Commands").expect("lazyblk -h lists its commands"))
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name != "help")
        .collect();
    let mut all = Vec::new();
    for name in names {
        collect(bin, vec![name], &mut all);
    }
    all
}

fn collect(bin: &Path, path: Vec<String>, all: &mut Vec<CommandHelp>) {
    let args: Vec<&str> = path.iter().map(String::as_str).collect();
    let (about, map) = sections(&help_text(bin, &args));
    let get = |title: &str| map.get(title).map(|l| entries(l)).unwrap_or_default();
    let subcommands: Vec<String> = get("Commands")
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name != "help")
        .collect();
    let options = get("Options")
        .into_iter()
        .filter(|(spec, _)| {
            long_name(spec).is_none_or(|long| !GLOBAL_FLAGS.contains(&long.as_str()))
        })
        .collect();
    all.push(CommandHelp {
        path: path.clone(),
        about,
        usage: map
            .get("Usage")
            .and_then(|l| l.first().cloned())
            .unwrap_or_default(),
        arguments: get("Arguments"),
        options,
        subcommands: subcommands.clone(),
    });
    for sub in subcommands {
        let mut sub_path = path.clone();
        sub_path.push(sub);
        collect(bin, sub_path, all);
    }
}

/// Markdown text outside code spans made literal: `\`, `<`, `*` and `|` (a table
/// cell's separator) escaped.
fn escape(text: &str) -> String {
    let mut out = String::new();
    for (i, part) in text.split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        if i % 2 == 1 {
            // Inside a code span only the table's separator needs escaping.
            out.push_str(&part.replace('|', "\\|"));
            continue;
        }
        for c in part.chars() {
            if matches!(c, '\\' | '<' | '*' | '|') {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

fn code(text: &str) -> String {
    format!("`{}`", text.replace('|', "\\|"))
}

/// The anchor of a command's heading in the reference (`lazyblk-overlay-create`).
pub fn anchor(command: &CommandHelp) -> String {
    format!("lazyblk-{}", command.path.join("-"))
}

/// The reference's generated part: a section per command.
pub fn render_reference(commands: &[CommandHelp]) -> String {
    let mut out = String::new();
    for command in commands {
        out.push_str(&format!("\n### `{}`\n\n", command.name()));
        if !command.about.is_empty() {
            out.push_str(&format!(
                "{}.\n\n",
                escape(command.about.trim_end_matches('.'))
            ));
        }
        out.push_str(&format!("```text\n{}\n```\n", command.usage));
        if !command.subcommands.is_empty() {
            let links: Vec<String> = command
                .subcommands
                .iter()
                .map(|sub| format!("[`{sub}`](#{}-{sub})", anchor(command)))
                .collect();
            out.push_str(&format!("\nCommands: {}.\n", links.join(", ")));
        }
        if !command.arguments.is_empty() || !command.options.is_empty() {
            out.push_str("\n| argument or flag | meaning |\n|---|---|\n");
            for (spec, desc) in command.arguments.iter().chain(&command.options) {
                out.push_str(&format!("| {} | {} |\n", code(spec), escape(desc)));
            }
        }
    }
    out
}

/// The front page's generated part: one row per command, linking to its section.
pub fn render_summary(commands: &[CommandHelp]) -> String {
    let mut out = String::from("\n| command | does |\n|---|---|\n");
    for command in commands.iter().filter(|c| c.path.len() == 1) {
        out.push_str(&format!(
            "| [`{}`](docs/commands.md#{}) | {} |\n",
            command.name(),
            anchor(command),
            escape(command.about.trim_end_matches('.'))
        ));
    }
    out
}

/// What a rendered reference documents: command name to its flag names.
pub fn documented_flags(reference: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in reference.lines() {
        if let Some(rest) = line.strip_prefix("### `") {
            let name = rest.trim_end_matches('`').to_string();
            map.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(name), Some(row)) = (&current, line.strip_prefix("| `")) {
            let spec = row.split("` |").next().unwrap_or("");
            if let Some(flag) = long_name(spec).filter(|f| f.starts_with('-')) {
                map.entry(name.clone()).or_default().insert(flag);
            }
        }
    }
    map
}

/// What the front page's summary documents: the commands it links.
pub fn documented_commands(summary: &str) -> BTreeSet<String> {
    summary
        .lines()
        .filter_map(|line| line.strip_prefix("| [`"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_string)
        .collect()
}

/// The differences between the binary's commands and flags and a documented set,
/// one line each, naming which side lacks what.
pub fn differences(
    binary: &[CommandHelp],
    documented: &BTreeMap<String, BTreeSet<String>>,
    where_documented: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    let real: BTreeMap<String, BTreeSet<String>> =
        binary.iter().map(|c| (c.name(), c.flag_names())).collect();
    for (name, flags) in &real {
        match documented.get(name) {
            None => out.push(format!(
                "`{name}` is in --help but not in {where_documented}"
            )),
            Some(doc) => {
                for flag in flags.difference(doc) {
                    out.push(format!(
                        "`{name} {flag}` is in --help but not in {where_documented}"
                    ));
                }
                for flag in doc.difference(flags) {
                    out.push(format!(
                        "`{name} {flag}` is in {where_documented} but not in --help"
                    ));
                }
            }
        }
    }
    for name in documented.keys().filter(|n| !real.contains_key(*n)) {
        out.push(format!(
            "`{name}` is in {where_documented} but not in --help"
        ));
    }
    out
}

/// The text of `text` between its `<!-- NAME:begin ... -->` line and its
/// `<!-- NAME:end -->` line: (before the block, the block, from the end marker on).
pub fn marked_block<'a>(text: &'a str, name: &str) -> Option<(&'a str, &'a str, &'a str)> {
    let begin = text.find(&format!("<!-- {name}:begin"))?;
    let body_start = begin + text[begin..].find('\n')? + 1;
    let end = body_start + text[body_start..].find(&format!("<!-- {name}:end -->"))?;
    Some((&text[..body_start], &text[body_start..end], &text[end..]))
}

/// `text` with the marked block `name` holding `body`.
pub fn replace_block(text: &str, name: &str, body: &str) -> Option<String> {
    let (before, _, after) = marked_block(text, name)?;
    // Blank lines around the block: a table or heading after an HTML comment line.
    Some(format!("{before}\n{}\n\n{after}", body.trim_matches('\n')))
}
