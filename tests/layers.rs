//! Issue 24: the crates' layers, read from their manifests. `image/` is a leaf (nothing
//! of the workspace), a frontend (`nbd-server/`, `fuse-mount/`, `ublk/`) depends on the image
//! crate only, and nothing below the binary depends on a frontend, so there is no
//! import circle and no import that runs back up a layer.

use std::collections::BTreeSet;
use std::path::Path;

/// The workspace crates a crate depends on (path dependencies, dev ones included).
fn workspace_deps(dir: &str) -> BTreeSet<String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(dir)
        .join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    let mut deps = BTreeSet::new();
    for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
        let Some(table) = parsed.get(section).and_then(|t| t.as_table()) else {
            continue;
        };
        for (name, spec) in table {
            if spec.get("path").is_some() {
                deps.insert(name.clone());
            }
        }
    }
    deps
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn the_image_crate_is_a_leaf_and_frontends_depend_on_it_alone() {
    assert_eq!(workspace_deps("image"), set(&[]), "image/ is a leaf");
    assert_eq!(workspace_deps("nbd-server"), set(&["lazyblk-image"]));
    assert_eq!(workspace_deps("fuse-mount"), set(&["lazyblk-image"]));
    assert_eq!(workspace_deps("ublk"), set(&["lazyblk-image"]));
    let cache = workspace_deps("cache");
    assert!(
        !cache.contains("lazyblk-nbd")
            && !cache.contains("lazyblk-fuse")
            && !cache.contains("lazyblk-ublk"),
        "the cache depends on a frontend: {cache:?}"
    );
}
