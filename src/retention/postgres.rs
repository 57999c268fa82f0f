//! Retention in the shared PostgreSQL database. Every replica sweeps; two
//! sweeps at once delete disjoint rows or wait on each other's row locks,
//! and each batch is one short statement, which leaves the tombstones of
//! what it deletes. Space: PostgreSQL's autovacuum
//! makes deleted rows' room reusable (the files do not shrink; a
//! `VACUUM FULL` or `pg_repack` in a maintenance window gives it back).

use sqlx::{PgPool, Row};

use super::{Cutoffs, RetentionStore, Swept};
use crate::store::StoreError;

pub struct PostgresRetention {
    pool: PgPool,
}

impl PostgresRetention {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// See the SQLite backend's `ACK_FLOOR`.
const ACK_FLOOR: &str = "
    SELECT COALESCE(MIN(CASE WHEN c.kind = 'work_queue'
        THEN LEAST(c.delivered_sequence,
                   COALESCE((SELECT MIN(p.sequence) FROM consumer_pending p
                             WHERE p.consumer = c.name) - 1, c.delivered_sequence))
        ELSE c.acked_sequence END), 9223372036854775807)
    FROM consumers c";

#[async_trait::async_trait]
impl RetentionStore for PostgresRetention {
    async fn sweep(&self, cutoffs: Cutoffs, batch: usize) -> Result<Swept, StoreError> {
        let batch = i64::try_from(batch).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await.map_err(backend)?;
        // Only constants go into the text.
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH floor AS ({ACK_FLOOR}),
             victims AS (
                SELECT sequence FROM notifications
                WHERE received_at < $1
                  AND sequence < (SELECT last FROM notification_sequence)
                  AND (sequence <= (SELECT * FROM floor) OR received_at < $2)
                ORDER BY received_at LIMIT $3
                FOR UPDATE SKIP LOCKED),
             gone AS (
                DELETE FROM notifications n USING victims v
                WHERE n.sequence = v.sequence RETURNING n.sequence, n.dedup_digest),
             tombstones AS (
                INSERT INTO swept_notifications (dedup_digest, sequence)
                SELECT dedup_digest, sequence FROM gone ON CONFLICT DO NOTHING)
             SELECT COUNT(*), COUNT(*) FILTER (WHERE sequence > (SELECT * FROM floor))
             FROM gone"
        )))
        .bind(cutoffs.keep_before)
        .bind(cutoffs.hard_before)
        .bind(batch)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        let notifications: i64 = row.try_get(0).map_err(backend)?;
        let unacknowledged: i64 = row.try_get(1).map_err(backend)?;
        if unacknowledged > 0 {
            // Deliveries of events that are gone go with them.
            sqlx::query(
                "DELETE FROM consumer_pending p \
                 WHERE NOT EXISTS (SELECT 1 FROM notifications n WHERE n.sequence = p.sequence)",
            )
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        let orders: i64 = sqlx::query_scalar(
            "WITH gone AS (
                DELETE FROM orders WHERE out_trade_id IN (
                    SELECT out_trade_id FROM orders
                    WHERE created_at < $1 AND updated_at < $1
                      AND (state IN ('PAID', 'FAILED')
                           OR (state IN ('CREATED', 'UNKNOWN') AND expires_at < $1))
                    ORDER BY created_at LIMIT $2
                    FOR UPDATE SKIP LOCKED)
                RETURNING out_trade_id, state),
             tombstones AS (
                INSERT INTO swept_orders (out_trade_id, paid)
                SELECT out_trade_id, state = 'PAID' FROM gone ON CONFLICT DO NOTHING)
             SELECT COUNT(*) FROM gone",
        )
        .bind(cutoffs.keep_before)
        .bind(batch)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(Swept {
            notifications: u64::try_from(notifications).unwrap_or(0),
            unacknowledged: u64::try_from(unacknowledged).unwrap_or(0),
            orders: u64::try_from(orders).unwrap_or(0),
        })
    }

    async fn first_retained(&self) -> Result<u64, StoreError> {
        sqlx::query_scalar::<_, i64>("SELECT COALESCE(MIN(sequence), 1) FROM notifications")
            .fetch_one(&self.pool)
            .await
            .map(|s| u64::try_from(s).unwrap_or(1))
            .map_err(backend)
    }

    async fn size_bytes(&self) -> Result<u64, StoreError> {
        sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
             WHERE c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace \
               AND c.relname IN ('notifications', 'notification_sequence', 'orders', \
                                 'consumers', 'consumer_pending', \
                                 'swept_notifications', 'swept_orders')",
        )
        .fetch_one(&self.pool)
        .await
        .map(|s| u64::try_from(s).unwrap_or(0))
        .map_err(backend)
    }

    async fn compact(&self) -> Result<(), StoreError> {
        // Autovacuum's work.
        Ok(())
    }
}
