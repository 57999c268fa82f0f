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
//!
//! The copy is written into a directory of its own beside the target, then
//! hard-linked into place: a link fails when its name exists, whatever that
//! name is, so a symbolic link planted there (before the check or during
//! the copy) is refused rather than written through.

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
    refuse_existing(to)?;
    let to = to.to_owned();
    tokio::task::spawn_blocking(move || copy(&from, &to))
        .await
        .map_err(|e| e.to_string())?
}

/// A backup writes a new file: an existing name, and above all a symbolic
/// link (which SQLite would follow, writing wherever it points), is refused.
fn refuse_existing(to: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(to) {
        Ok(meta) if meta.file_type().is_symlink() => Err(format!(
            "{} is a symbolic link; a backup writes a new file, never through a link",
            to.display()
        )),
        Ok(_) => Err(format!(
            "{} exists; a backup writes a new file",
            to.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("checking {}: {e}", to.display())),
    }
}

fn copy(from: &Path, to: &Path) -> Result<Copied, String> {
    if !from.exists() {
        return Err(format!("no store at {}", from.display()));
    }
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = to
        .file_name()
        .ok_or_else(|| format!("{} names no file", to.display()))?;
    // Made here and now (mkdir fails on any existing name), so nothing in
    // it was planted.
    let work = parent.join(format!(
        ".{}.backup-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let result = copy_into(from, &work.join("copy.db")).and_then(|copied| {
        place(&work.join("copy.db"), to)?;
        Ok(copied)
    });
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Puts the finished copy at `to`, which must still not exist.
fn place(copy: &Path, to: &Path) -> Result<(), String> {
    match std::fs::hard_link(copy, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            refuse_existing(to)?;
            Err(format!("{} appeared during the backup", to.display()))
        }
        // A file system without hard links: a rename, which replaces a
        // link rather than following it, after one more look.
        Err(_) => {
            refuse_existing(to)?;
            std::fs::rename(copy, to)
                .map_err(|e| format!("moving the copy to {}: {e}", to.display()))
        }
    }
}

fn copy_into(from: &Path, to: &Path) -> Result<Copied, String> {
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
        .map_err(|e| format!("copying {}: {e}", from.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> String {
        let path = dir.join("store.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE notifications (sequence INTEGER PRIMARY KEY); \
             INSERT INTO notifications VALUES (1), (2);",
        )
        .unwrap();
        format!("sqlite://{}", path.display())
    }

    #[tokio::test]
    async fn a_backup_refuses_a_symbolic_link_even_one_that_points_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let url = store(dir.path());
        let elsewhere = dir.path().join("elsewhere.db");
        let link = dir.path().join("backup.db");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let err = backup(&url, &link).await.unwrap_err();
        assert!(err.contains("is a symbolic link"), "{err}");
        assert!(!elsewhere.exists(), "written through the link");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[tokio::test]
    async fn a_backup_writes_a_new_file_and_leaves_nothing_else_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let url = store(dir.path());
        let to = dir.path().join("backup.db");
        let copied = backup(&url, &to).await.unwrap();
        assert_eq!((copied.notifications, copied.last_sequence), (2, 2));
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["backup.db", "store.db"]);
        let err = backup(&url, &to).await.unwrap_err();
        assert!(err.contains("exists"), "{err}");
    }
}
