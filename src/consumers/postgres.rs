//! Consumers in PostgreSQL (the `consumers` table), shared by every
//! replica.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row, postgres::PgRow};

use super::{Consumer, ConsumerStore};
use crate::store::StoreError;

pub struct PostgresConsumers {
    pool: PgPool,
}

impl PostgresConsumers {
    /// The consumers on the store's pool (its migrations already applied).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// The newest sequence stored, less the consumer's position.
const SELECT: &str = "SELECT c.name, c.acked_sequence, \
     GREATEST(s.last - c.acked_sequence, 0), c.updated_at \
     FROM consumers c CROSS JOIN notification_sequence s";

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn row_to_consumer(r: &PgRow) -> Result<Consumer, StoreError> {
    Ok(Consumer {
        name: r.try_get(0).map_err(backend)?,
        acked_sequence: u64::try_from(r.try_get::<i64, _>(1).map_err(backend)?).unwrap_or(0),
        lag: u64::try_from(r.try_get::<i64, _>(2).map_err(backend)?).unwrap_or(0),
        last_ack_at: r.try_get::<DateTime<Utc>, _>(3).map_err(backend)?,
    })
}

#[async_trait::async_trait]
impl ConsumerStore for PostgresConsumers {
    async fn get(&self, name: &str) -> Result<Option<Consumer>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE c.name = $1")))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?
            .as_ref()
            .map(row_to_consumer)
            .transpose()
    }

    async fn list(&self, after: &str, limit: usize) -> Result<Vec<Consumer>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE c.name > $1 ORDER BY c.name LIMIT $2"
        )))
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?
        .iter()
        .map(row_to_consumer)
        .collect()
    }

    async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM consumers WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(deleted.rows_affected() > 0)
    }
}
