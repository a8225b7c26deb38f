//! Strings from outside this process (leases, a store's or a daemon's error messages,
//! labels) made safe to show: every control character is written as its escape
//! (`\u{1b}`, `\n`), so a lease cannot clear or retitle an operator's terminal, hide a
//! table cell or forge a line in a table or a log. Used at every display point of the
//! CLI and, through [`LogWriter`], for every line of the text log.

use std::borrow::Cow;
use std::io::Write;

/// Whether `c` must not reach a terminal as itself: C0 controls (newline included), DEL,
/// C1 controls, and the bidirectional overrides that reorder what a line shows.
fn hidden(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with each character [`hidden`] says must not be shown written as its escape.
pub fn printable(s: &str) -> Cow<'_, str> {
    escape_except(s, |_| false)
}

/// Like [`printable`], keeping newlines and tabs: for this program's own multi-line
/// messages, whose untrusted parts went through [`printable`] already.
pub fn printable_lines(s: &str) -> Cow<'_, str> {
    escape_except(s, |c| c == '\n' || c == '\t')
}

fn escape_except(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(|c| hidden(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if hidden(c) && !keep(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The text log's writer: standard error, each line's control characters escaped (a
/// heartbeat's URL or a peer's error message cannot end a log line early and forge the
/// next). `tracing-subscriber` escapes ESC in field values itself but not newlines or
/// carriage returns. With colours on, ESC is kept: the formatter's own colour codes
/// use it, and values' ESC was escaped before this writer sees the line.
pub struct LogWriter {
    /// Whether the formatter writes colour codes (stderr is a terminal).
    pub colour: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = EscapingStderr;

    fn make_writer(&'a self) -> EscapingStderr {
        EscapingStderr {
            colour: self.colour,
        }
    }
}

/// One log line's way to standard error (see [`LogWriter`]).
pub struct EscapingStderr {
    colour: bool,
}

impl Write for EscapingStderr {
    /// The formatter hands over a whole line (it formats each event into one buffer).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (line, end) = match text.strip_suffix('\n') {
            Some(line) => (line, "\n"),
            None => (&*text, ""),
        };
        let colour = self.colour;
        let escaped = escape_except(line, |c| colour && c == '\u{1b}');
        let mut err = std::io::stderr().lock();
        err.write_all(escaped.as_bytes())?;
        err.write_all(end.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("py311 READY"), "py311 READY");
        assert!(matches!(printable("plain"), Cow::Borrowed(_)));
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\r\ny"), "x\\r\\ny");
        assert_eq!(printable("\u{9b}31m\u{7f}"), "\\u{9b}31m\\u{7f}");
        assert_eq!(printable("abc\u{202e}def"), "abc\\u{202e}def");
        assert_eq!(printable("ünïcode ok"), "ünïcode ok");
        assert_eq!(printable_lines("one\n\ttwo\u{7}"), "one\n\ttwo\\u{7}");
    }
}
