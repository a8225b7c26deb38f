//! Strings from the network shown to an operator (lease data, error messages, labels):
//! control characters are replaced, so no escape sequence reaches a terminal or a log.

use std::borrow::Cow;

/// `s` with every control character (C0, DEL, C1) replaced by `?`.
pub fn clean(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_replaced() {
        assert_eq!(super::clean("node\x1b[31m\n\u{9b}x"), "node?[31m??x");
        assert_eq!(super::clean("plain"), "plain");
    }
}
