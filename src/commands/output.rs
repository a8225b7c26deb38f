//! How the commands print: the one JSON printer of `--json`, aligned tables, and sizes
//! in binary units. Strings a server sends are shown through
//! [`crate::printable::printable`] (they may quote what a client or a peer sent).

use serde::Serialize;

/// Prints a server's answer (or a command's result) as `--json` does: pretty JSON on
/// stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// What `--json` prints on stdout when a command fails (exit status 1): the message
/// the `error:` line on stderr shows, and the HTTP status the server refused with
/// (`null` when no server answered: unreachable, or refused before anything was sent).
#[derive(Serialize, serde::Deserialize, Debug, PartialEq, Eq)]
pub struct Failure {
    pub error: String,
    pub status: Option<u16>,
}

impl Failure {
    /// The failure `e`, whose message (`{e:#}`, made printable) is `message`.
    pub fn of(e: &anyhow::Error, message: String) -> Failure {
        let status = e.chain().find_map(|cause| {
            if let Some(refused) = cause.downcast_ref::<super::node_client::Refused>() {
                return Some(refused.status);
            }
            match cause.downcast_ref::<crate::store::client::StoreError>() {
                Some(crate::store::client::StoreError::Http { status, .. }) => Some(*status),
                _ => None,
            }
        });
        Failure {
            error: message,
            status,
        }
    }
}

/// Rows of cells in aligned columns, two spaces apart, each line's end trimmed.
pub fn aligned<R: AsRef<[String]>>(rows: &[R]) -> String {
    let columns = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.as_ref().get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Bytes in binary units, as an operator reads them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `local` of `total` as a whole percentage (100% of nothing).
pub fn percent(local: usize, total: usize) -> String {
    match (local * 100).checked_div(total) {
        Some(p) => format!("{p}%"),
        None => "100%".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_units_read() {
        let rows = vec![
            vec!["A".to_string(), "B".into()],
            vec!["long".to_string(), "x".into()],
        ];
        assert_eq!(aligned(&rows), "A     B\nlong  x\n");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(percent(1, 4), "25%");
        assert_eq!(percent(0, 0), "100%");
    }
}
