//! The grammar of labels (a manifest's `labels`, `--label KEY=VALUE`) and of the label
//! policy's keys, written down in docs/template-center.md ("Label grammar").
//!
//! Keys are label keys as Kubernetes and OCI annotations spell them: letters, digits,
//! `.`, `-`, `_` and `/`, beginning and ending with a letter or digit (`guest_agent`,
//! `org.opencontainers.image.version`, `app.kubernetes.io/name`). Values are any text
//! without control characters (OCI annotation values are free text: `sha256:...`,
//! `demo:1`, a description). Each has a size limit, and a manifest a count limit, so a
//! label cannot grow a manifest, a listing or a table without bound.

/// Longest key, in bytes: a DNS name's limit, which Kubernetes uses for a key's prefix.
pub const MAX_LABEL_KEY: usize = 253;
/// Longest value, in bytes: room for an OCI image's description or a digest; a
/// manifest is read by every node, and its labels are listed with every template.
pub const MAX_LABEL_VALUE: usize = 1024;
/// Labels a manifest may carry: OCI images carry tens; every listing repeats them.
pub const MAX_LABELS: usize = 128;

/// Checks a label key (also a policy key).
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    let inner = |b: u8| b.is_ascii_alphanumeric() || b"._-/".contains(&b);
    if key.len() > MAX_LABEL_KEY {
        return Err(format!(
            "label key of {} bytes: keys are at most {MAX_LABEL_KEY}",
            key.len()
        ));
    }
    if key.is_empty()
        || !edge(key.bytes().next())
        || !edge(key.bytes().last())
        || !key.bytes().all(inner)
    {
        return Err(format!(
            "label key {:?}: keys are letters, digits, '.', '-', '_' and '/', beginning and ending with a letter or digit",
            key.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

/// Checks a label value.
pub fn validate_label_value(key: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_LABEL_VALUE {
        return Err(format!(
            "label {key}: a value of {} bytes; values are at most {MAX_LABEL_VALUE}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "label {key}: its value holds control characters, which labels may not"
        ));
    }
    Ok(())
}

/// Checks a label, key and value.
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    validate_label_key(key)?;
    validate_label_value(key, value)
}

/// Checks a set of labels: each of them, and how many there are.
pub fn validate_labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels: a template carries at most {MAX_LABELS}",
            labels.len()
        ));
    }
    for (key, value) in labels {
        validate_label(key, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_label_grammar() {
        for ok in [
            "guest_agent",
            "a",
            "org.opencontainers.image.version",
            "app.kubernetes.io/name",
            "oci.digest",
        ] {
            assert!(validate_label_key(ok).is_ok(), "{ok}");
        }
        let long = "k".repeat(MAX_LABEL_KEY + 1);
        for bad in [
            "", "bad key", "bad\nkey", "-x", "x-", ".x", "x/", "é", &long,
        ] {
            assert!(validate_label_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_are_text_of_bounded_size() {
        assert!(validate_label("d", "sha256:abc, demo:1 and a description").is_ok());
        assert!(validate_label("d", "").is_ok());
        assert!(validate_label("d", "a\u{1b}[2J").is_err());
        assert!(validate_label("d", "two\nlines").is_err());
        assert!(validate_label("d", &"v".repeat(MAX_LABEL_VALUE + 1)).is_err());
    }
}
