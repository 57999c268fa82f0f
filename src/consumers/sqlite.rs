//! Consumers in the SQLite store's file (its `consumers` table), on a
//! connection of their own; positions move through the store's writer.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use chrono::DateTime;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{Consumer, ConsumerStore};
use crate::store::StoreError;

pub struct SqliteConsumers {
    conn: Arc<Mutex<Connection>>,
}

/// The newest sequence stored, less the consumer's position.
const SELECT: &str = "SELECT name, acked_sequence, \
     MAX((SELECT COALESCE(MAX(sequence), 0) FROM notifications) - acked_sequence, 0), \
     updated_at_ms FROM consumers";

impl SqliteConsumers {
    /// Opens the consumers of the store at `path` (already migrated).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)
            .and_then(|c| {
                c.pragma_update(None, "busy_timeout", 5000)?;
                c.pragma_update(None, "synchronous", "FULL")?;
                Ok(c)
            })
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || f(&conn.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?
            .map_err(|e| StoreError::Backend(e.to_string()))
    }
}

fn row_to_consumer(r: &Row<'_>) -> rusqlite::Result<Consumer> {
    Ok(Consumer {
        name: r.get(0)?,
        acked_sequence: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
        lag: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
        last_ack_at: DateTime::from_timestamp_millis(r.get(3)?).unwrap_or_default(),
    })
}

#[async_trait::async_trait]
impl ConsumerStore for SqliteConsumers {
    async fn get(&self, name: &str) -> Result<Option<Consumer>, StoreError> {
        let name = name.to_owned();
        self.with(move |conn| {
            conn.prepare_cached(&format!("{SELECT} WHERE name = ?1"))?
                .query_row([name], row_to_consumer)
                .optional()
        })
        .await
    }

    async fn list(&self, after: &str, limit: usize) -> Result<Vec<Consumer>, StoreError> {
        let after = after.to_owned();
        self.with(move |conn| {
            conn.prepare_cached(&format!("{SELECT} WHERE name > ?1 ORDER BY name LIMIT ?2"))?
                .query_map(
                    params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
                    row_to_consumer,
                )?
                .collect()
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.with(move |conn| {
            Ok(conn.execute("DELETE FROM consumers WHERE name = ?1", [name])? > 0)
        })
        .await
    }
}
