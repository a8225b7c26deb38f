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
    /// `None` when `garage` is not on PATH and `LAZYBLK_S3_TEST` is unset (the script
    /// would spend minutes building it; with the variable set it does). A start that
    /// fails once Garage is there is a failure of the test, not a skip.
    pub fn start() -> Option<Garage> {
        let on_path = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join("garage").is_file()))
            .unwrap_or(false);
        if !on_path && std::env::var_os("LAZYBLK_S3_TEST").is_none() {
            return None;
        }
        let dir = tempfile::tempdir().expect("garage directory");
        let out = Command::new(script("garage.sh"))
            .arg("start")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/garage.sh");
        // Built before the checks, so a failed start still stops what it started.
        let mut garage = Garage {
            dir,
            env: Vec::new(),
        };
        assert!(out.status.success(), "scripts/garage.sh start failed");
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        garage.env = line
            .trim()
            .strip_prefix("export ")
            .unwrap_or_else(|| panic!("no export line from garage.sh: {line:?}"))
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(garage)
    }

    pub fn var(&self, name: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("garage.sh printed no {name}"))
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
