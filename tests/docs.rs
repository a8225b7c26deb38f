//! The documentation checks itself against the repository and the real binary (issue
//! 30, "Docs a newcomer can walk"):
//!
//! - every relative link and `#anchor` in README.md and docs/*.md resolves, with
//!   anchors made as GitHub makes them from headings;
//! - the command reference (docs/commands.md) and the front page's command table are
//!   what the binary's `-h` says: every command, its usage, arguments and flags. Both
//!   are generated into marked blocks; `LAZYBLK_BLESS_DOCS=1 cargo test --test docs`
//!   rewrites them after the command line changes;
//! - the front page's single node and two-node fleet run as written (in a network
//!   namespace, on their default addresses);
//! - DESIGN.md section 7 (the command-line contract, kept beside the repository in
//!   ../shared; checked when LAZYBLK_DESIGN_MD points at it) names every command, and
//!   every flag it names exists.

mod docs {
    pub mod design;
    pub mod links;
    pub mod quickstart;
    pub mod reference;
}

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use docs::reference::{self, CommandHelp};
use docs::{design, links, quickstart};

/// Set to 1 to rewrite the generated blocks from the binary instead of failing.
const BLESS_VAR: &str = "LAZYBLK_BLESS_DOCS";
/// Where DESIGN.md is (beside the repository, in ../shared): the check runs only when set.
const DESIGN_VAR: &str = "LAZYBLK_DESIGN_MD";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lazyblk"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// README.md and every page of docs/.
fn markdown_files() -> Vec<PathBuf> {
    let root = repo();
    let mut files = vec![root.join("README.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("a docs/ folder")
        .map(|entry| entry.expect("listing docs/").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    files.extend(pages);
    files
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let files = markdown_files();
    assert!(files.len() > 10, "README.md and the docs/ pages: {files:?}");
    let broken = links::check(&repo(), &files);
    assert!(
        broken.is_empty(),
        "{} broken links:\n{}",
        broken.len(),
        broken
            .iter()
            .map(|b| format!("  {b}\n"))
            .collect::<String>()
    );
}

#[test]
fn every_docs_page_is_in_the_index() {
    let index = read(&repo().join("docs/README.md"));
    let front = read(&repo().join("README.md"));
    for file in markdown_files().iter().skip(1) {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "README.md" {
            continue;
        }
        assert!(
            index.contains(&format!("]({name})")),
            "docs/README.md does not link {name}"
        );
        assert!(
            front.contains(&format!("](docs/{name})")),
            "README.md does not link docs/{name}"
        );
    }
}

/// The checker itself finds each kind of broken link, and only those: a missing file,
/// a missing anchor (in another page and in its own), a path out of the repository;
/// links in code and with a scheme are not checked.
#[test]
fn the_link_checker_reports_each_kind_of_broken_link() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root = dir.path().join("repo");
    std::fs::create_dir_all(root.join("docs")).expect("mkdir");
    std::fs::write(root.join("outside.md"), "# Outside\n").expect("write");
    std::fs::write(
        root.join("docs/b.md"),
        "# Page B\n\n## Two words\n\n## Two words\n\n## `lazyblk warm`: fill, status\n",
    )
    .expect("write");
    std::fs::write(
        root.join("README.md"),
        "# Front\n\n## Own heading\n\n\
         [ok](docs/b.md) [ok](docs/b.md#two-words-1) [ok](docs/b.md#lazyblk-warm-fill-status)\n\
         [ok](#own-heading) [ok](docs/) ![ok](docs/b.md) [ok](https://example.com/x.md)\n\
         [missing file](docs/c.md) [missing anchor](docs/b.md#three-words)\n\
         [own missing](#nowhere) [escapes](../elsewhere.md)\n\
         `[in code](docs/none.md)` and [not a definition]: docs/none.md\n\
         [ref]: docs/gone.md\n\
         ```sh\n[fenced](docs/fenced.md)\n```\n",
    )
    .expect("write");
    let broken = links::check(&root, &[root.join("README.md")]);
    let mut got: Vec<&str> = broken.iter().map(|b| b.target.as_str()).collect();
    let mut expected = vec![
        "docs/c.md",
        "docs/b.md#three-words",
        "#nowhere",
        "../elsewhere.md",
        "docs/gone.md",
    ];
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "{broken:#?}");
}

#[test]
fn anchors_are_made_as_github_makes_them() {
    for (heading, anchor) in [
        (
            "Warming, status, eviction: a node's replicas",
            "warming-status-eviction-a-nodes-replicas",
        ),
        ("`lazyblk overlay create`", "lazyblk-overlay-create"),
        ("B9: the fleet", "b9-the-fleet"),
        ("What `status` shows", "what-status-shows"),
        (
            "The node's own disk, scrub and DEGRADED",
            "the-nodes-own-disk-scrub-and-degraded",
        ),
        ("[Fleet](fleet.md) and peers", "fleet-and-peers"),
        ("snake_case and **bold**", "snake_case-and-bold"),
    ] {
        assert_eq!(links::github_anchor(heading), anchor, "{heading}");
    }
}

/// docs/commands.md and the front page against `lazyblk -h` and `lazyblk CMD -h`.
#[test]
fn command_reference_matches_help() {
    let commands = reference::from_binary(&bin());
    assert!(
        commands.iter().any(|c| c.path == ["daemon"])
            && commands.iter().any(|c| c.path == ["overlay", "create"]),
        "the binary's commands were read: {:?}",
        commands.iter().map(CommandHelp::name).collect::<Vec<_>>()
    );
    let bless = std::env::var(BLESS_VAR).is_ok_and(|v| v == "1");
    let mut failures = Vec::new();

    let page_path = repo().join("docs/commands.md");
    let mut page = read(&page_path);
    let generated = reference::render_reference(&commands);
    if bless {
        page = reference::replace_block(&page, "reference", &generated)
            .expect("docs/commands.md has its reference:begin/end markers");
        std::fs::write(&page_path, &page).expect("writing docs/commands.md");
    }
    let (_, block, _) = reference::marked_block(&page, "reference")
        .expect("docs/commands.md has its reference:begin/end markers");
    failures.extend(reference::differences(
        &commands,
        &reference::documented_flags(block),
        "docs/commands.md",
    ));
    if failures.is_empty() && block.trim() != generated.trim() {
        failures.push(format!(
            "docs/commands.md: a usage line or description differs from -h:\n{}",
            first_difference(block.trim(), generated.trim())
        ));
    }
    for flag in reference::GLOBAL_FLAGS {
        if !page.contains(&format!("`{flag}")) && !page.contains(&format!("{flag}`")) {
            failures.push(format!(
                "docs/commands.md does not describe the global flag {flag}"
            ));
        }
    }

    let front_path = repo().join("README.md");
    let mut front = read(&front_path);
    let summary = reference::render_summary(&commands);
    if bless {
        front = reference::replace_block(&front, "commands", &summary)
            .expect("README.md has its commands:begin/end markers");
        std::fs::write(&front_path, &front).expect("writing README.md");
    }
    let (_, block, _) = reference::marked_block(&front, "commands")
        .expect("README.md has its commands:begin/end markers");
    let top: BTreeMap<String, BTreeSet<String>> = commands
        .iter()
        .filter(|c| c.path.len() == 1)
        .map(|c| (c.name(), BTreeSet::new()))
        .collect();
    let listed: BTreeMap<String, BTreeSet<String>> = reference::documented_commands(block)
        .into_iter()
        .map(|name| (name, BTreeSet::new()))
        .collect();
    let top_commands: Vec<CommandHelp> = commands
        .iter()
        .filter(|c| top.contains_key(&c.name()))
        .map(|c| CommandHelp {
            options: Vec::new(),
            ..c.clone()
        })
        .collect();
    failures.extend(reference::differences(
        &top_commands,
        &listed,
        "README.md's command table",
    ));
    if block.trim() != summary.trim() {
        failures.push(format!(
            "README.md's command table differs from -h:\n{}",
            first_difference(block.trim(), summary.trim())
        ));
    }

    assert!(
        failures.is_empty(),
        "the documented command line is not the binary's:\n  {}\n\
         After changing the command line: {BLESS_VAR}=1 cargo test --test docs",
        failures.join("\n  ")
    );
}

/// The first line where `documented` and `generated` differ, both sides shown.
fn first_difference(documented: &str, generated: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) =
        (documented.lines().collect(), generated.lines().collect());
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(""),
            b.get(i).copied().unwrap_or(""),
        );
        if x != y {
            return format!(
                "  line {}:\n    documented: {x}\n    -h says:    {y}",
                i + 1
            );
        }
    }
    String::new()
}

/// DESIGN.md, when LAZYBLK_DESIGN_MD names it: it is kept beside the repository, not
/// in it, so a checkout's tests cannot depend on it (and section 7 still names the
/// `attach --kind` of issue 26 and lacks commands added since).
fn design_md() -> Option<PathBuf> {
    std::env::var_os(DESIGN_VAR).map(PathBuf::from)
}

#[test]
fn design_section_7_agrees_with_help() {
    let Some(path) = design_md() else {
        eprintln!(
            "DESIGN.md is kept beside the repository; set {DESIGN_VAR}=../shared/DESIGN.md to check it"
        );
        return;
    };
    let text = read(&path);
    let start = text.find("## 7.").expect("DESIGN.md has a section 7");
    let end = text[start + 5..]
        .find("\n## ")
        .map_or(text.len(), |i| start + 5 + i);
    let commands = reference::from_binary(&bin());
    let (named, mut failures) = design::section_7_commands(&text[start..end], &commands);
    let real: BTreeMap<String, &CommandHelp> = commands.iter().map(|c| (c.name(), c)).collect();
    for command in &commands {
        let covered = named.contains_key(&command.name())
            || (command.path.len() == 2
                && named.contains_key(&format!("lazyblk {}", command.path[0])));
        let group_covered = !command.subcommands.is_empty()
            && command
                .subcommands
                .iter()
                .any(|s| named.contains_key(&format!("{} {s}", command.name())));
        if !covered && !group_covered {
            failures.push(format!(
                "`{}` is in --help but not in DESIGN.md section 7",
                command.name()
            ));
        }
    }
    for (name, flags) in &named {
        let Some(command) = real.get(name) else {
            continue;
        };
        let have = command.flag_names();
        for flag in flags
            .iter()
            .filter(|f| !have.contains(*f) && !reference::GLOBAL_FLAGS.contains(&f.as_str()))
        {
            failures.push(format!(
                "DESIGN.md section 7 gives `{name} {flag}`, which --help does not have"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "DESIGN.md section 7 ({}) and --help disagree:\n  {}",
        path.display(),
        failures.join("\n  ")
    );
}

/// The front page's ten commands, run as written: a store, a template built from
/// /usr/share/doc, a node read over NBD, then two fleet members that warm it.
#[test]
fn front_page_commands_run_as_written() {
    let readme = read(&repo().join("README.md"));
    let single = quickstart::block_under(&readme, "A single node in five commands");
    let fleet = quickstart::block_under(&readme, "A two-node fleet in five more");
    assert_eq!(
        (single.len(), fleet.len()),
        (5, 5),
        "{single:#?} {fleet:#?}"
    );
    // A network namespace of its own: the commands use the default addresses.
    let probe = std::process::Command::new("unshare")
        .args(["--net", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: `unshare --net` is not allowed here (needs root)");
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let script = dir.path().join("front-page.sh");
    std::fs::write(&script, quickstart::script(&single, &fleet)).expect("writing the script");
    let bin_dir = bin().parent().expect("the binary's folder").to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = std::process::Command::new("timeout")
        .args(["600", "unshare", "--net", "--", "bash"])
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("LAZYBLK_LOG", "error")
        .output()
        .expect("running the front page's commands");
    let transcript = String::from_utf8_lossy(&output.stdout).to_string();
    let servers = std::fs::read_to_string(dir.path().join("servers.log")).unwrap_or_default();
    let context = format!(
        "{transcript}\nstderr: {}\nservers: {servers}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        transcript.contains("+ end"),
        "the commands did not all run:\n{context}"
    );
    let outputs = quickstart::outputs(&transcript);
    let of = |prefix: &str| -> &str {
        outputs
            .iter()
            .find(|(command, _)| command.starts_with(prefix))
            .map(|(_, out)| out.as_str())
            .unwrap_or_else(|| panic!("no command {prefix:?} ran:\n{context}"))
    };
    assert!(of("lazyblk build").contains("published docs:"), "{context}");
    assert!(of("nbdinfo").contains("export=\"docs\""), "{context}");
    let single_status = outputs
        .iter()
        .find(|(command, _)| command == "lazyblk status docs")
        .map(|(_, out)| out.as_str())
        .unwrap_or_default();
    assert!(single_status.contains("PENDING"), "{context}");
    let nodes = of("lazyblk nodes");
    assert!(
        nodes.contains("http://127.0.0.1:7071") && nodes.contains("http://127.0.0.1:7072"),
        "{context}"
    );
    assert!(of("lazyblk warm").contains("wish recorded"), "{context}");
    let ready = of("lazyblk status docs --fleet")
        .lines()
        .filter(|l| l.contains("READY"))
        .count();
    assert_eq!(ready, 2, "both nodes READY:\n{context}");
}
