//! The bytes fetched for each template, by source, with its corrupt chunks and last
//! error: what `status` shows of a replica's fetches.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Bytes fetched for one template, by source.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TemplateBytes {
    pub by_source: BTreeMap<String, u64>,
    pub corrupt: u64,
    pub last_error: Option<String>,
}

/// Every template's [`TemplateBytes`].
#[derive(Default)]
pub struct PerTemplate(Mutex<BTreeMap<String, TemplateBytes>>);

impl PerTemplate {
    /// Bytes fetched for `template`, by source.
    pub fn get(&self, template: &str) -> TemplateBytes {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(template)
            .cloned()
            .unwrap_or_default()
    }

    /// Changes the counts of `template` (made at zero when it has none yet).
    pub fn update(&self, template: &str, f: impl FnOnce(&mut TemplateBytes)) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(template.to_string()).or_default());
    }
}
