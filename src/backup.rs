//! `kongtie-gateway backup PATH`: a consistent copy of the SQLite store,
//! taken while the gateway runs.
//!
//! `VACUUM INTO` reads the database in one read transaction: in WAL mode it
//! sees one snapshot (every commit before it began, none after) and never
//! holds the writer up; the WAL's checkpoints wait for it to finish past
//! its snapshot. The copy is compact, a database of its own (no WAL beside
//! it), with the same schema version, so a gateway started on it carries on
//! from its newest sequence. PostgreSQL stores are backed up with the
//! database's own tools (`pg_dump`, or base backups and WAL archiving for
//! point-in-time recovery).

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub notifications: u64,
    pub last_sequence: u64,
    pub bytes: u64,
}

/// Copies the store `url` names to `to`, which must not exist.
pub async fn backup(url: &str, to: &Path) -> Result<Copied, String> {
    let from = match url.split_once("://") {
        Some(("sqlite", path)) if !path.is_empty() => Path::new(path).to_owned(),
        Some(("postgres" | "postgresql", _)) => {
            return Err(
                "a PostgreSQL store is backed up with PostgreSQL's tools: pg_dump, or base \
                 backups with WAL archiving for point-in-time recovery (see the README)"
                    .into(),
            );
        }
        _ => return Err("the store URL is not sqlite://PATH".into()),
    };
    if to.exists() {
        return Err(format!(
            "{} exists; a backup writes a new file",
            to.display()
        ));
    }
    let to = to.to_owned();
    tokio::task::spawn_blocking(move || copy(&from, &to))
        .await
        .map_err(|e| e.to_string())?
}

fn copy(from: &Path, to: &Path) -> Result<Copied, String> {
    if !from.exists() {
        return Err(format!("no store at {}", from.display()));
    }
    let source = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|c| c.pragma_update(None, "busy_timeout", 5000).map(|()| c))
    .map_err(|e| format!("opening {}: {e}", from.display()))?;
    let target = to
        .to_str()
        .ok_or_else(|| format!("{} is not valid UTF-8", to.display()))?;
    source
        .execute("VACUUM INTO ?1", [target])
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    let copy = Connection::open_with_flags(to, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("opening the copy: {e}"))?;
    let (notifications, last_sequence): (i64, i64) = copy
        .query_row(
            "SELECT COUNT(*), COALESCE(MAX(sequence), 0) FROM notifications",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(|e| format!("reading the copy: {e}"))?;
    let check: String = copy
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| format!("checking the copy: {e}"))?;
    if check != "ok" {
        return Err(format!("the copy failed its check: {check}"));
    }
    Ok(Copied {
        notifications: u64::try_from(notifications).unwrap_or(0),
        last_sequence: u64::try_from(last_sequence).unwrap_or(0),
        bytes: std::fs::metadata(to).map_or(0, |m| m.len()),
    })
}
