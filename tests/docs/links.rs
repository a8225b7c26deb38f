//! Relative links and `#anchors` in Markdown, resolved as GitHub renders them.
//!
//! A link is `[text](target)` or `![alt](target)` outside code (fenced blocks and
//! inline code spans), or a reference definition `[name]: target`. A target with a
//! scheme (`https:`, `mailto:`, `file:`) is not checked; any other must name a file or
//! folder inside the repository, and its `#anchor` one of the headings of the Markdown
//! file it names (or of the file itself, for `#anchor` alone).

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// One link that does not resolve: where it is and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Broken {
    pub file: PathBuf,
    pub line: usize,
    pub target: String,
    pub reason: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: ({}) {}",
            self.file.display(),
            self.line,
            self.target,
            self.reason
        )
    }
}

/// The lines of `text` outside fenced code blocks, numbered from 1, with inline code
/// spans blanked out (so a link or heading quoted in code is not one).
pub fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker: String = trimmed
            .chars()
            .take_while(|c| *c == '`' || *c == '~')
            .collect();
        if marker.len() >= 3
            && marker
                .chars()
                .all(|c| c == marker.chars().next().unwrap_or('`'))
        {
            match &fence {
                None => {
                    fence = Some(marker);
                    continue;
                }
                Some(open) if marker.starts_with(open.as_str()) => {
                    fence = None;
                    continue;
                }
                Some(_) => {}
            }
        }
        if fence.is_none() {
            out.push((i + 1, blank_code_spans(line)));
        }
    }
    out
}

/// `line` with the content of every inline code span (and its backticks) replaced by
/// spaces; an unclosed backtick is kept as text.
fn blank_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|c| **c == '`').count();
        // The closing run has exactly as many backticks.
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let r = chars[j..].iter().take_while(|c| **c == '`').count();
                if r == run {
                    close = Some(j + r);
                    break;
                }
                j += r;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                out.extend(std::iter::repeat_n(' ', end - i));
                i = end;
            }
            None => {
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    out
}

/// The link targets of one prose line.
pub fn link_targets(line: &str) -> Vec<String> {
    let mut targets = Vec::new();
    // A reference definition: `[name]: target`.
    let trimmed = line.trim_start();
    if trimmed.starts_with('[') {
        if let Some(end) = trimmed.find("]:") {
            let target = trimmed[end + 2..].split_whitespace().next().unwrap_or("");
            if !target.is_empty() {
                targets.push(target.trim_matches(|c| c == '<' || c == '>').to_string());
            }
        }
    }
    // Inline links: `](target)`, the target up to its closing parenthesis (balanced)
    // or the first space (a title follows).
    let bytes = line.as_bytes();
    let mut at = 0;
    while let Some(found) = line[at..].find("](") {
        let start = at + found + 2;
        let mut depth = 0usize;
        let mut end = start;
        while end < bytes.len() {
            match bytes[end] {
                b'(' => depth += 1,
                b')' if depth == 0 => break,
                b')' => depth -= 1,
                b' ' => break,
                _ => {}
            }
            end += 1;
        }
        let target = line[start..end].trim_matches(|c| c == '<' || c == '>');
        if !target.is_empty() {
            targets.push(target.to_string());
        }
        at = end.max(start);
    }
    targets
}

/// The anchor GitHub gives a heading: its text as rendered (links by their text,
/// emphasis and code markers dropped), lower-cased, every character that is not a
/// letter, a digit, `-`, `_` or a space dropped, spaces made hyphens.
pub fn github_anchor(heading: &str) -> String {
    let text = link_text(heading);
    text.trim()
        .chars()
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// `[text](target)` replaced by `text`, `*` and `` ` `` dropped.
fn link_text(heading: &str) -> String {
    let mut out = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](") else {
            break;
        };
        let Some(close) = rest[open + mid..].find(')') else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..open + mid]);
        rest = &rest[open + mid + close + 1..];
    }
    out.push_str(rest);
    out.replace(['*', '`'], "")
}

/// Every anchor a Markdown file has: its headings' (repeats get `-1`, `-2`, ... as on
/// GitHub) and explicit `<a name="...">` / `id="..."` ones.
pub fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut fence = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fence = !fence;
            continue;
        }
        if fence {
            continue;
        }
        for key in ["name=\"", "id=\""] {
            let mut rest = line;
            while let Some(at) = rest.find(key) {
                let value = &rest[at + key.len()..];
                if let Some(end) = value.find('"') {
                    seen.insert(value[..end].to_string());
                }
                rest = &rest[at + key.len()..];
            }
        }
        let level = trimmed.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&level) && trimmed[level..].starts_with(' ') {
            let heading = trimmed[level..].trim().trim_end_matches('#').trim();
            let base = github_anchor(heading);
            let mut anchor = base.clone();
            let mut n = 0;
            while seen.contains(&anchor) {
                n += 1;
                anchor = format!("{base}-{n}");
            }
            seen.insert(anchor);
        }
    }
    seen
}

/// The broken links of `files` (Markdown files under `root`).
pub fn check(root: &Path, files: &[PathBuf]) -> Vec<Broken> {
    let mut broken = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                broken.push(Broken {
                    file: file.clone(),
                    line: 0,
                    target: String::new(),
                    reason: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        for (line, prose) in prose_lines(&text) {
            for target in link_targets(&prose) {
                if let Err(reason) = resolve(root, file, &text, &target) {
                    broken.push(Broken {
                        file: file.strip_prefix(root).unwrap_or(file).to_path_buf(),
                        line,
                        target,
                        reason,
                    });
                }
            }
        }
    }
    broken.sort();
    broken
}

/// Whether `target`, linked from `file` (whose text is `text`), resolves.
fn resolve(root: &Path, file: &Path, text: &str, target: &str) -> Result<(), String> {
    if has_scheme(target) {
        return Ok(());
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let path = path.split('?').next().unwrap_or(path);
    let (resolved, target_text) = if path.is_empty() {
        (file.to_path_buf(), Some(text.to_string()))
    } else {
        if path.starts_with('/') {
            return Err("absolute path: link relative to the file instead".into());
        }
        let dir = file.parent().unwrap_or(root);
        let joined = normalize(&dir.join(path));
        if !joined.starts_with(normalize(root)) {
            return Err("leaves the repository".into());
        }
        if !joined.exists() {
            return Err(format!("no such file: {}", joined.display()));
        }
        let is_markdown = joined.extension().is_some_and(|e| e == "md");
        let target_text = if is_markdown {
            Some(std::fs::read_to_string(&joined).map_err(|e| format!("cannot read: {e}"))?)
        } else {
            None
        };
        (joined, target_text)
    };
    let Some(anchor) = anchor else {
        return Ok(());
    };
    let Some(target_text) = target_text else {
        return Err(format!(
            "#{anchor} into {}, which is not Markdown",
            resolved.display()
        ));
    };
    let known = anchors(&target_text);
    if known.contains(anchor) {
        Ok(())
    } else {
        Err(format!(
            "no heading with anchor #{anchor} in {} (it has: {})",
            resolved.strip_prefix(root).unwrap_or(&resolved).display(),
            known.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }
}

fn has_scheme(target: &str) -> bool {
    match target.split_once(':') {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
                && !scheme.contains('/')
        }
        None => false,
    }
}

/// `path` with `.` and `..` resolved lexically (no symlinks followed).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}
