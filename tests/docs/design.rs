//! DESIGN.md section 7, the command-line contract, read as the commands and flags its
//! table names, to compare with the binary's `--help`.

use std::collections::{BTreeMap, BTreeSet};

use super::reference::CommandHelp;

/// DESIGN.md section 7's commands and the flags each row names: `lazyblk warm ID
/// [--wait] [--redo]` gives `lazyblk warm` {--wait, --redo}; a span without `lazyblk`
/// (`overlay delete SB`, `unwarm`) is a command too.
pub fn section_7_commands(
    section: &str,
    known: &[CommandHelp],
) -> (BTreeMap<String, BTreeSet<String>>, Vec<String>) {
    let groups: BTreeSet<String> = known
        .iter()
        .filter(|c| !c.subcommands.is_empty())
        .map(|c| c.path[0].clone())
        .collect();
    let tops: BTreeSet<String> = known.iter().map(|c| c.path[0].clone()).collect();
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unknown = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = line
            .trim_start_matches('|')
            .split(" |")
            .next()
            .unwrap_or("");
        for (i, span) in first_cell.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            let span = span.replace("\\|", "|");
            let words: Vec<&str> = span.split_whitespace().collect();
            let words = match words.first() {
                Some(&"lazyblk") => &words[1..],
                _ => &words[..],
            };
            let Some(first) = words.first() else { continue };
            if !tops.contains(*first) {
                if first.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    && !first.starts_with('-')
                {
                    unknown.push(format!(
                        "DESIGN.md section 7 names `lazyblk {first}`, which --help does not have"
                    ));
                }
                continue;
            }
            let mut name = format!("lazyblk {first}");
            if groups.contains(*first) {
                if let Some(sub) = words.get(1).filter(|w| !w.starts_with('-')) {
                    name = format!("{name} {sub}");
                }
            }
            let flags = words
                .iter()
                .flat_map(|w| w.split(['[', ']', '|', '=']))
                .filter(|w| w.starts_with("--"))
                .map(|w| w.trim_end_matches([',', '.', ')']).to_string());
            map.entry(name).or_default().extend(flags);
        }
    }
    (map, unknown)
}
