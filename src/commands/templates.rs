//! `lazyblk templates`: the store's templates, their durability and replicas, as a
//! table or JSON.

use clap::Args;
use indicatif::HumanBytes;

use super::output::print_json;
use crate::flags::{parse_label, DEFAULT_STORE};
use crate::printable::printable;
use crate::store::client::connect;
use crate::store::TemplateSummary;

#[derive(Args, Debug, Clone)]
pub struct TemplatesArgs {
    /// URL of the artifact store.
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Only templates with this label (KEY=VALUE; repeatable, all must match).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Only STALE templates (below the store's label policy): what to rebuild.
    #[arg(long)]
    pub stale: bool,
}

/// `lazyblk templates`.
pub async fn run(args: TemplatesArgs) -> anyhow::Result<()> {
    let client = connect(&args.store, None, None)?;
    let mut templates = client.templates().await?;
    templates.retain(|t| {
        args.labels.iter().all(|(k, v)| t.labels.get(k) == Some(v)) && (!args.stale || t.stale)
    });
    if args.json {
        return print_json(&templates);
    }
    print!("{}", table(&templates));
    Ok(())
}

/// The `templates` table: one row per template, columns padded to their widest cell.
fn table(templates: &[TemplateSummary]) -> String {
    let header = [
        "TEMPLATE",
        "SIZE",
        "CHUNKS",
        "STORED",
        "DURABILITY",
        "REPLICAS",
        "PARENT",
        "CREATED",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for t in templates {
        rows.push(vec![
            t.template.clone(),
            HumanBytes(t.size).to_string(),
            t.chunks.to_string(),
            format!("{}/{}", t.present_chunks, t.stored_chunks),
            if t.stale {
                format!("{} STALE", t.durability.as_str())
            } else {
                t.durability.as_str().to_string()
            },
            t.replicas
                .as_ref()
                .map_or("-".to_string(), |r| r.status.clone()),
            t.parent.clone().unwrap_or_else(|| "-".to_string()),
            if t.created_at.is_empty() {
                "-".to_string()
            } else {
                t.created_at.clone()
            },
        ]);
    }
    // Cells hold what a manifest or a node said (a parent, a creation time): shown
    // without control characters.
    for cell in rows.iter_mut().flatten() {
        *cell = printable(cell).into_owned();
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Durability;

    #[test]
    fn table_aligns_columns() {
        let row = TemplateSummary {
            template: "py311".into(),
            size: 64 << 20,
            chunk_size: 1 << 20,
            chunks: 64,
            stored_chunks: 10,
            stored_bytes: 10 << 20,
            present_chunks: 4,
            parent: None,
            replicas: None,
            stale: false,
            stale_because: None,
            labels: Default::default(),
            origins: vec![],
            created_at: "2026-11-22T10:00:00Z".into(),
            durability: Durability::Uploading,
        };
        let out = table(&[row]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("TEMPLATE  SIZE"), "{out}");
        assert!(
            lines[1].contains("4/10") && lines[1].contains("UPLOADING"),
            "{out}"
        );
        assert_eq!(lines[0].find("CHUNKS"), lines[1].find("64 "), "{out}");
    }
}
