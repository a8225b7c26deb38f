use super::*;
use crate::daemon::node_state::phases::{Phase, ReplicaRecord};

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A node directory as lazyblk wrote it before this owner existed (each file in the
/// bytes that code wrote), read back whole.
#[test]
fn an_older_nodes_directory_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let conn = rusqlite::Connection::open(root.join("state.db")).unwrap();
    conn.execute_batch(
        "CREATE TABLE replicas (template TEXT PRIMARY KEY, phase TEXT NOT NULL,
             chunks_local INTEGER NOT NULL DEFAULT 0, chunks_total INTEGER NOT NULL DEFAULT 0,
             last_error TEXT, last_error_at TEXT, updated_at TEXT NOT NULL);
         INSERT INTO replicas VALUES ('base', 'READY', 6, 6, NULL, NULL, '2026-12-01T00:00:00Z');",
    )
    .unwrap();
    drop(conn);
    std::fs::create_dir(root.join("originated")).unwrap();
    std::fs::write(root.join("originated/child"), "child").unwrap();
    std::fs::create_dir(root.join("manifests")).unwrap();
    std::fs::write(root.join("manifests/base.json"), b"{}").unwrap();
    std::fs::write(root.join("manifests/base.sig"), b"{}").unwrap();
    std::fs::write(root.join("manifests/.other.json.7.0.tmp"), b"{").unwrap();
    std::fs::write(root.join("wished.json"), br#"{"base":2}"#).unwrap();
    std::fs::write(
        root.join("kernel-devices.json"),
        b"[\n  {\n    \"index\": 3,\n    \"export\": \"base\"\n  }\n]",
    )
    .unwrap();
    std::fs::write(root.join("node-id"), "0123abcd\n").unwrap();

    let state = NodeState::open(root).unwrap();
    let id = state.node_id().to_string();
    assert_eq!(
        state.phases().all().unwrap(),
        [ReplicaRecord {
            template: "base".into(),
            phase: Phase::Ready,
            chunks_local: 6,
            chunks_total: 6,
            last_error: None,
            last_error_at: None,
        }]
    );
    assert_eq!(state.intents().list(), ["child"]);
    assert_eq!(state.manifests().list(), ["base"]);
    let saved = state.manifests().read("base", true).unwrap();
    assert_eq!(saved.signature.as_deref(), Some(&b"{}"[..]));
    assert_eq!(state.wishes(), Wishes::from([("base".to_string(), 2)]));
    let devices: Vec<serde_json::Value> = state.devices_file().load().unwrap().unwrap();
    assert_eq!(devices[0]["index"], 3);
    // The temporary file a crash left is dropped, the retired id's file removed.
    assert_eq!(names(&root.join("manifests")), ["base.json", "base.sig"]);
    assert!(!root.join("node-id").exists());
    drop(state);
    assert_eq!(NodeState::open(root).unwrap().node_id(), id);
}

/// Every store written through the owner reads back after a reopen, and no write
/// leaves a temporary file.
#[test]
fn every_store_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let state = NodeState::open(root).unwrap();
    let id = state.node_id().to_string();
    let record = ReplicaRecord {
        template: "t".into(),
        phase: Phase::Distributing,
        chunks_local: 1,
        chunks_total: 4,
        last_error: None,
        last_error_at: None,
    };
    state.phases().save(&record).unwrap();
    state.intents().record("c").unwrap();
    state.manifests().write("t", b"m", Some(b"s")).unwrap();
    state.manifests().write("u", b"m2", None).unwrap();
    let wishes = Wishes::from([("t".to_string(), 1)]);
    state.save_wishes(&wishes).unwrap();
    state.devices_file().save(&vec![1u32, 2]).unwrap();
    drop(state);

    let state = NodeState::open(root).unwrap();
    assert_eq!(state.node_id(), id);
    assert_eq!(state.phases().all().unwrap(), [record]);
    assert_eq!(state.intents().list(), ["c"]);
    assert_eq!(state.manifests().list(), ["t", "u"]);
    let t = state.manifests().read("t", true).unwrap();
    assert_eq!(
        (t.manifest, t.signature),
        (b"m".to_vec(), Some(b"s".to_vec()))
    );
    assert_eq!(state.manifests().read("u", true).unwrap().signature, None);
    assert_eq!(state.wishes(), wishes);
    assert_eq!(
        state.devices_file::<Vec<u32>>().load().unwrap(),
        Some(vec![1, 2])
    );
    state.manifests().remove("t").unwrap();
    assert_eq!(state.manifests().list(), ["u"]);
    for sub in ["", "manifests", "originated"] {
        let left: Vec<_> = names(&root.join(sub))
            .into_iter()
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
}

/// An unreadable wishes file is an empty one (the next heartbeat acts on the wishes
/// again), not a failed start.
#[test]
fn unreadable_wishes_read_as_none() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("wished.json"), b"{not json").unwrap();
    let state = NodeState::open(dir.path()).unwrap();
    assert!(state.wishes().is_empty());
}
