//! Object storage servers on loopback for tests that need one shared by several
//! processes: Azurite (scripts/azurite.sh) and Garage (scripts/garage.sh). Each is
//! stopped on drop; `start` is `None` (the caller skips, saying why) when it cannot be
//! installed or started here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// An Azurite (Azure Blob emulator) with one container.
pub struct Azurite {
    dir: tempfile::TempDir,
    /// Its blob endpoint, for `AZURITE_BLOB_STORAGE_URL`.
    pub url: String,
}

impl Azurite {
    pub fn start(container: &str) -> Option<Azurite> {
        let dir = tempfile::tempdir().ok()?;
        let out = Command::new(script("azurite.sh"))
            .arg("start")
            .arg(dir.path())
            .arg(container)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .ok()?;
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let url = line
            .trim()
            .strip_prefix("export AZURITE_BLOB_STORAGE_URL=")
            .map(str::to_string);
        let azurite = Azurite {
            dir,
            url: url.unwrap_or_default(),
        };
        (out.status.success() && !azurite.url.is_empty()).then_some(azurite)
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = Command::new(script("azurite.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// A single-node Garage (S3-compatible) with bucket `lazyblk`.
pub struct Garage {
    dir: tempfile::TempDir,
    /// (name, value) of the variables the script printed to export.
    pub env: Vec<(String, String)>,
}

impl Garage {
    /// `None` when `garage` is not on PATH (the script would spend minutes building it).
    pub fn start() -> Option<Garage> {
        let on_path = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join("garage").is_file()))
            .unwrap_or(false);
        if !on_path {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let out = Command::new(script("garage.sh"))
            .arg("start")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .ok()?;
        let mut garage = Garage {
            dir,
            env: Vec::new(),
        };
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        garage.env = line
            .trim()
            .strip_prefix("export ")?
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        out.status.success().then_some(garage)
    }

    pub fn var(&self, name: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = Command::new(script("garage.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .status();
    }
}
