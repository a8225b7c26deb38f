//! The node's state database (SQLite): each replica's phase and fill progress, so that
//! a restarted daemon knows which replicas were READY (and pins them again), which were
//! filling (and resumes), and what last went wrong.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection};

pub use crate::store::nodes::Phase;

impl Phase {
    /// The phase a database row names (an unknown name, from a newer lazyblk, reads as
    /// PENDING: the replica is filled again if it is wished).
    fn parse(s: &str) -> Phase {
        match s {
            "DISTRIBUTING" => Phase::Distributing,
            "READY" => Phase::Ready,
            "FAILED" => Phase::Failed,
            "CLEANING" => Phase::Cleaning,
            _ => Phase::Pending,
        }
    }
}

/// What the database keeps of one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub template: String,
    pub phase: Phase,
    /// Local chunks at the last save (a phase change, or a fill's checkpoint); the live
    /// count is the replica's.
    pub chunks_local: u64,
    pub chunks_total: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

/// A failure of the state database.
#[derive(Debug, thiserror::Error)]
#[error("state database {path}: {source}")]
pub struct StateError {
    path: PathBuf,
    source: rusqlite::Error,
}

/// The node's state database.
pub struct StateDb {
    path: PathBuf,
    /// One connection; statements are short, so a mutex is cheaper than a pool.
    conn: Mutex<Connection>,
}

impl StateDb {
    pub fn open(path: &Path) -> Result<StateDb, StateError> {
        let err = |source| StateError {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        // WAL with synchronous=NORMAL: commits survive a daemon crash (SIGKILL) without
        // an fsync per progress update; only a power loss may lose the last updates,
        // and the fill then simply re-checks which chunks are local.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS replicas (
                 template TEXT PRIMARY KEY,
                 phase TEXT NOT NULL,
                 chunks_local INTEGER NOT NULL DEFAULT 0,
                 chunks_total INTEGER NOT NULL DEFAULT 0,
                 last_error TEXT,
                 last_error_at TEXT,
                 updated_at TEXT NOT NULL
             );",
        )
        .map_err(err)?;
        Ok(StateDb {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, source: rusqlite::Error) -> StateError {
        StateError {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes a replica's record.
    pub fn save(&self, r: &ReplicaRecord) -> Result<(), StateError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.execute(
            "INSERT INTO replicas (template, phase, chunks_local, chunks_total, last_error, last_error_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(template) DO UPDATE SET phase=?2, chunks_local=?3, chunks_total=?4,
                 last_error=?5, last_error_at=?6, updated_at=?7",
            params![
                r.template,
                r.phase.as_str(),
                r.chunks_local as i64,
                r.chunks_total as i64,
                r.last_error,
                r.last_error_at,
                now_rfc3339()
            ],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    #[cfg(test)]
    pub fn load(&self, template: &str) -> Result<Option<ReplicaRecord>, StateError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.query_row(
            "SELECT template, phase, chunks_local, chunks_total, last_error, last_error_at FROM replicas WHERE template = ?1",
            params![template],
            row_to_record,
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(|e| self.err(e))
    }

    pub fn all(&self) -> Result<Vec<ReplicaRecord>, StateError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut stmt = conn
            .prepare("SELECT template, phase, chunks_local, chunks_total, last_error, last_error_at FROM replicas ORDER BY template")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], row_to_record)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }
}

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<ReplicaRecord> {
    Ok(ReplicaRecord {
        template: row.get(0)?,
        phase: Phase::parse(&row.get::<_, String>(1)?),
        chunks_local: row.get::<_, i64>(2)? as u64,
        chunks_total: row.get::<_, i64>(3)? as u64,
        last_error: row.get(4)?,
        last_error_at: row.get(5)?,
    })
}

/// Now as RFC 3339 UTC, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut r = ReplicaRecord {
            template: "py311".into(),
            phase: Phase::Distributing,
            chunks_local: 3,
            chunks_total: 10,
            last_error: None,
            last_error_at: None,
        };
        StateDb::open(&path).unwrap().save(&r).unwrap();
        let db = StateDb::open(&path).unwrap();
        assert_eq!(db.load("py311").unwrap().unwrap(), r);
        r.phase = Phase::Failed;
        r.last_error = Some("store unreachable".into());
        db.save(&r).unwrap();
        assert_eq!(db.all().unwrap(), vec![r]);
        assert!(db.load("other").unwrap().is_none());
    }
}
