//! Consumers in the SQLite store's file (its `consumers` table), on a
//! connection of their own; positions move through the store's writer.

use std::path::Path;

use chrono::DateTime;
use rusqlite::{OptionalExtension, Row, params};

use super::{Consumer, ConsumerStore};
use crate::store::{SideConnection, StoreError};

pub struct SqliteConsumers {
    conn: SideConnection,
}

/// The newest sequence stored, less the consumer's position.
const SELECT: &str = "SELECT name, acked_sequence, \
     MAX((SELECT COALESCE(MAX(sequence), 0) FROM notifications) - acked_sequence, 0), \
     updated_at_ms FROM consumers";

impl SqliteConsumers {
    /// Opens the consumers of the store at `path` (already migrated).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            conn: SideConnection::open(path)?,
        })
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
        self.conn
            .with(move |conn| {
                conn.prepare_cached(&format!("{SELECT} WHERE name = ?1"))?
                    .query_row([name], row_to_consumer)
                    .optional()
            })
            .await
    }

    async fn list(&self, after: &str, limit: usize) -> Result<Vec<Consumer>, StoreError> {
        let after = after.to_owned();
        self.conn
            .with(move |conn| {
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
        self.conn
            .with(move |conn| {
                Ok(conn.execute("DELETE FROM consumers WHERE name = ?1", [name])? > 0)
            })
            .await
    }
}
