//! Consumers in PostgreSQL (the `consumers` and `consumer_pending` tables),
//! shared by every replica. An operation on a work queue locks its
//! consumer row first (`SELECT ... FOR UPDATE`), so fetches, acks and naks
//! of one queue, from any replica, take turns; times are the database's
//! (`now()`), so replicas' clocks do not matter.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction, postgres::PgRow};

use super::{
    Acked, Consumer, ConsumerError, ConsumerRow, ConsumerStore, Fetched, Kind, Leased,
    PARKED_SHOWN, QueueSettings, millis, same_queue, start_after,
};
use crate::store::{StoreError, postgres_rows};

pub struct PostgresConsumers {
    pool: PgPool,
}

impl PostgresConsumers {
    /// The consumers on the store's pool (its migrations already applied).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A consumer and the counts of its pending events.
const SELECT: &str = "SELECT c.name, c.kind, c.acked_sequence, c.last_ack_at, c.created_at, \
     c.deliver_policy, COALESCE(c.policy_sequence, 0), COALESCE(c.ack_wait_ms, 0), \
     COALESCE(c.max_deliver, 0)::bigint, COALESCE(c.max_ack_pending, 0)::bigint, \
     c.delivered_sequence, c.last_fetch_at, \
     (c.stream_holder IS NOT NULL AND c.stream_until > now()), s.last, \
     p.oldest, COALESCE(p.n, 0), COALESCE(p.leased, 0), COALESCE(p.parked, 0), \
     COALESCE(p.redelivered, 0) \
     FROM consumers c CROSS JOIN notification_sequence s LEFT JOIN LATERAL ( \
       SELECT MIN(sequence) AS oldest, COUNT(*) AS n, \
         COUNT(*) FILTER (WHERE leased_until > now()) AS leased, \
         COUNT(*) FILTER (WHERE deliveries_left = 0 AND leased_until <= now()) AS parked, \
         COUNT(*) FILTER (WHERE delivery_count > 1 \
           AND NOT (deliveries_left = 0 AND leased_until <= now())) AS redelivered \
       FROM consumer_pending WHERE consumer = c.name \
     ) p ON true";

fn row_to_consumer(r: &PgRow) -> Result<ConsumerRow, sqlx::Error> {
    Ok(ConsumerRow {
        name: r.try_get(0)?,
        kind: r.try_get(1)?,
        acked_sequence: from_sql(r.try_get(2)?),
        last_ack_at: r.try_get::<Option<DateTime<Utc>>, _>(3)?,
        created_at: r.try_get::<Option<DateTime<Utc>>, _>(4)?,
        deliver_policy: r.try_get(5)?,
        policy_sequence: from_sql(r.try_get(6)?),
        ack_wait_ms: r.try_get(7)?,
        max_deliver: r.try_get(8)?,
        max_ack_pending: r.try_get(9)?,
        delivered_sequence: from_sql(r.try_get(10)?),
        last_fetch_at: r.try_get::<Option<DateTime<Utc>>, _>(11)?,
        streaming: r.try_get(12)?,
        last: from_sql(r.try_get(13)?),
        oldest_pending: r.try_get::<Option<i64>, _>(14)?.map(from_sql),
        pending_rows: from_sql(r.try_get(15)?),
        leased: from_sql(r.try_get(16)?),
        parked: from_sql(r.try_get(17)?),
        redelivered: from_sql(r.try_get(18)?),
    })
}

async fn select_one(conn: &mut PgConnection, name: &str) -> Result<Option<Consumer>, StoreError> {
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE c.name = $1")))
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?
    else {
        return Ok(None);
    };
    let row = row_to_consumer(&row).map_err(backend)?;
    let parked: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM consumer_pending WHERE consumer = $1 \
         AND deliveries_left = 0 AND leased_until <= now() ORDER BY sequence LIMIT $2",
    )
    .bind(name)
    .bind(PARKED_SHOWN as i64)
    .fetch_all(&mut *conn)
    .await
    .map_err(backend)?;
    Ok(Some(
        row.assemble(parked.into_iter().map(from_sql).collect()),
    ))
}

/// A work queue's settings for an operation on it, its row locked until
/// the transaction ends; refuses a cursor.
struct Queue {
    ack_wait_ms: i64,
    max_deliver: i32,
    max_ack_pending: i64,
    delivered: u64,
}

async fn lock_queue(
    tx: &mut Transaction<'_, Postgres>,
    name: &str,
) -> Result<Queue, ConsumerError> {
    let row = sqlx::query(
        "SELECT kind, COALESCE(ack_wait_ms, 0), COALESCE(max_deliver, 0), \
         COALESCE(max_ack_pending, 0)::bigint, delivered_sequence \
         FROM consumers WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_optional(&mut **tx)
    .await
    .map_err(backend)?
    .ok_or_else(|| ConsumerError::NotFound(name.to_owned()))?;
    work_queue(&row, name)?;
    Ok(Queue {
        ack_wait_ms: row.try_get(1).map_err(backend)?,
        max_deliver: row.try_get(2).map_err(backend)?,
        max_ack_pending: row.try_get(3).map_err(backend)?,
        delivered: from_sql(row.try_get(4).map_err(backend)?),
    })
}

/// Refuses to go on past events retention deleted before the queue got
/// them (`oldest` is the first event it would get after `delivered`).
fn behind_retention(name: &str, delivered: u64, oldest: u64) -> Result<(), ConsumerError> {
    if oldest > delivered.saturating_add(1) {
        return Err(ConsumerError::BehindRetention {
            name: name.to_owned(),
            delivered,
            first: oldest,
        });
    }
    Ok(())
}

/// Refuses a cursor where a work queue is meant, from a row whose first
/// column is the kind.
fn work_queue(row: &PgRow, name: &str) -> Result<(), ConsumerError> {
    let kind: String = row.try_get(0).map_err(backend)?;
    match Kind::parse(&kind) {
        Some(Kind::WorkQueue) => Ok(()),
        other => Err(ConsumerError::WrongKind {
            name: name.to_owned(),
            kind: other.unwrap_or(Kind::Cursor),
        }),
    }
}

/// Refuses a work queue where a cursor is meant.
async fn refuse_queue(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<(), ConsumerError> {
    let kind: Option<String> =
        sqlx::query_scalar("SELECT kind FROM consumers WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut **tx)
            .await
            .map_err(backend)?;
    match kind.as_deref().and_then(Kind::parse) {
        Some(Kind::WorkQueue) => Err(ConsumerError::WrongKind {
            name: name.to_owned(),
            kind: Kind::WorkQueue,
        }),
        _ => Ok(()),
    }
}

async fn last_sequence(tx: &mut Transaction<'_, Postgres>) -> Result<u64, StoreError> {
    sqlx::query_scalar::<_, i64>("SELECT last FROM notification_sequence")
        .fetch_one(&mut **tx)
        .await
        .map(from_sql)
        .map_err(backend)
}

/// `(sequence, delivery_count, leased_until)` rows, in sequence order.
fn leases(rows: &[PgRow]) -> Result<Vec<(i64, i32, DateTime<Utc>)>, StoreError> {
    let mut out = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(backend)?;
    out.sort_by_key(|l| l.0);
    Ok(out)
}

#[async_trait::async_trait]
impl ConsumerStore for PostgresConsumers {
    async fn get(&self, name: &str) -> Result<Option<Consumer>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        select_one(&mut conn, name).await
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
        .map(|r| Ok(row_to_consumer(r).map_err(backend)?.assemble(Vec::new())))
        .collect()
    }

    async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        // Its pending rows go with it (ON DELETE CASCADE).
        let deleted = sqlx::query("DELETE FROM consumers WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn ack_cursor(&self, name: &str, sequence: u64) -> Result<u64, ConsumerError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        refuse_queue(&mut tx, name).await?;
        // Only up to the last sequence, and only forward.
        let acked: Option<i64> = sqlx::query_scalar(
            "INSERT INTO consumers (name, acked_sequence, updated_at, last_ack_at, created_at) \
             SELECT $1, $2, now(), now(), now() FROM notification_sequence WHERE $2 <= last \
             ON CONFLICT (name) DO UPDATE SET \
               acked_sequence = GREATEST(consumers.acked_sequence, EXCLUDED.acked_sequence), \
               updated_at = EXCLUDED.updated_at, last_ack_at = EXCLUDED.last_ack_at \
             RETURNING acked_sequence",
        )
        .bind(name)
        .bind(to_sql(sequence))
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(acked) = acked else {
            let last = last_sequence(&mut tx).await?;
            return Err(StoreError::BeyondLast {
                requested: sequence,
                last,
            }
            .into());
        };
        tx.commit().await.map_err(backend)?;
        Ok(from_sql(acked))
    }

    async fn hold_stream(
        &self,
        name: &str,
        holder: &str,
        hold: Duration,
    ) -> Result<u64, ConsumerError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        refuse_queue(&mut tx, name).await?;
        let acked: Option<i64> = sqlx::query_scalar(
            "INSERT INTO consumers (name, acked_sequence, updated_at, created_at, \
               stream_holder, stream_until) \
             VALUES ($1, 0, now(), now(), $2, now() + $3::float8 * interval '1 millisecond') \
             ON CONFLICT (name) DO UPDATE SET \
               stream_holder = EXCLUDED.stream_holder, stream_until = EXCLUDED.stream_until \
             WHERE consumers.stream_holder IS NULL OR consumers.stream_holder = $2 \
               OR consumers.stream_until <= now() \
             RETURNING acked_sequence",
        )
        .bind(name)
        .bind(holder)
        .bind(millis(hold) as f64)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(acked) = acked else {
            return Err(ConsumerError::InUse {
                name: name.to_owned(),
            });
        };
        tx.commit().await.map_err(backend)?;
        Ok(from_sql(acked))
    }

    async fn renew_stream(
        &self,
        name: &str,
        holder: &str,
        hold: Duration,
    ) -> Result<bool, StoreError> {
        let renewed = sqlx::query(
            "UPDATE consumers SET stream_holder = $2, \
               stream_until = now() + $3::float8 * interval '1 millisecond' \
             WHERE name = $1 AND (stream_holder = $2 OR stream_holder IS NULL)",
        )
        .bind(name)
        .bind(holder)
        .bind(millis(hold) as f64)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(renewed.rows_affected() > 0)
    }

    async fn release_stream(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE consumers SET stream_holder = NULL, stream_until = NULL \
             WHERE name = $1 AND stream_holder = $2",
        )
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn create(
        &self,
        name: &str,
        settings: &QueueSettings,
    ) -> Result<Consumer, ConsumerError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        // Creates of one name take turns (the row may not exist to lock).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('kongtie.consumer:' || $1, 0))")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        if let Some(existing) = select_one(&mut tx, name).await? {
            return if same_queue(&existing, settings) {
                Ok(existing)
            } else {
                Err(ConsumerError::Exists(Box::new(existing)))
            };
        }
        let first =
            sqlx::query_scalar::<_, i64>("SELECT COALESCE(MIN(sequence), 1) FROM notifications")
                .fetch_one(&mut *tx)
                .await
                .map(from_sql)
                .map_err(backend)?;
        let start = start_after(
            name,
            settings.deliver_policy,
            first,
            last_sequence(&mut tx).await?,
        )?;
        let (policy, policy_sequence) = settings.deliver_policy.columns();
        let inserted = sqlx::query(
            "INSERT INTO consumers (name, kind, acked_sequence, updated_at, created_at, \
             deliver_policy, policy_sequence, ack_wait_ms, max_deliver, max_ack_pending, \
             delivered_sequence) \
             VALUES ($1, 'work_queue', 0, now(), now(), $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(policy)
        .bind(to_sql(policy_sequence))
        .bind(settings.ack_wait_ms())
        .bind(i32::try_from(settings.max_deliver).unwrap_or(i32::MAX))
        .bind(i32::try_from(settings.max_ack_pending).unwrap_or(i32::MAX))
        .bind(to_sql(start))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let created = select_one(&mut tx, name).await?;
        tx.commit().await.map_err(backend)?;
        match created {
            // A cursor of that name was created meanwhile (by an ack).
            Some(c) if inserted.rows_affected() == 0 => Err(ConsumerError::Exists(Box::new(c))),
            Some(c) => Ok(c),
            None => Err(ConsumerError::NotFound(name.to_owned())),
        }
    }

    async fn fetch(&self, name: &str, max: u32, touch: bool) -> Result<Fetched, ConsumerError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let q = lock_queue(&mut tx, name).await?;
        let wait = q.ack_wait_ms as f64;
        let parked = sqlx::query(
            "UPDATE consumer_pending SET parked_at = now() WHERE consumer = $1 \
             AND deliveries_left = 0 AND leased_until <= now() AND parked_at IS NULL",
        )
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(backend)?
        .rows_affected();
        // Redeliveries first, in sequence order.
        let due = sqlx::query(
            "UPDATE consumer_pending p SET delivery_count = p.delivery_count + 1, \
               deliveries_left = p.deliveries_left - 1, \
               leased_until = now() + $3::float8 * interval '1 millisecond' \
             FROM (SELECT sequence FROM consumer_pending WHERE consumer = $1 \
                   AND deliveries_left > 0 AND leased_until <= now() \
                   ORDER BY sequence LIMIT $2) d \
             WHERE p.consumer = $1 AND p.sequence = d.sequence \
             RETURNING p.sequence, p.delivery_count, p.leased_until",
        )
        .bind(name)
        .bind(i64::from(max))
        .bind(wait)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        let mut leased = leases(&due)?;
        let redelivered = leased.len();
        // Then new events, while fewer than max_ack_pending are pending.
        let pending: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM consumer_pending WHERE consumer = $1 \
             AND NOT (deliveries_left = 0 AND leased_until <= now())",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        let room = (i64::from(max) - redelivered as i64).min(q.max_ack_pending - pending);
        if room > 0 {
            let fresh = sqlx::query(
                "INSERT INTO consumer_pending \
                 (consumer, sequence, delivery_count, deliveries_left, leased_until) \
                 SELECT $1, sequence, 1, $2, now() + $3::float8 * interval '1 millisecond' \
                 FROM notifications WHERE sequence > $4 ORDER BY sequence LIMIT $5 \
                 RETURNING sequence, delivery_count, leased_until",
            )
            .bind(name)
            .bind(q.max_deliver - 1)
            .bind(wait)
            .bind(to_sql(q.delivered))
            .bind(room)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
            let fresh = leases(&fresh)?;
            if let Some(&(oldest, ..)) = fresh.first() {
                // Sequences are gapless: a gap is events retention deleted
                // before this queue got them. The transaction rolls back.
                behind_retention(name, q.delivered, from_sql(oldest))?;
            }
            if let Some(newest) = fresh.last() {
                sqlx::query("UPDATE consumers SET delivered_sequence = $2 WHERE name = $1")
                    .bind(name)
                    .bind(newest.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
            }
            leased.extend(fresh);
        }
        if touch || !leased.is_empty() {
            sqlx::query("UPDATE consumers SET last_fetch_at = now() WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        let next_due: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM MIN(leased_until) - now())::float8 \
             FROM consumer_pending WHERE consumer = $1 AND leased_until > now()",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        let sequences: Vec<i64> = leased.iter().map(|l| l.0).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM notifications WHERE sequence = ANY($1)",
            postgres_rows::COLUMNS
        )))
        .bind(&sequences)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        let mut by_sequence = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            let n = postgres_rows::to_stored(r).map_err(backend)?;
            by_sequence.insert(to_sql(n.sequence), n);
        }
        let mut events = Vec::with_capacity(leased.len());
        for (sequence, count, until) in leased {
            let notification = by_sequence.remove(&sequence).ok_or_else(|| {
                StoreError::Backend(format!("notification {sequence} is not stored"))
            })?;
            events.push(Leased {
                notification,
                delivery_count: u32::try_from(count).unwrap_or(0),
                lease_expires_at: until,
            });
        }
        tx.commit().await.map_err(backend)?;
        Ok(Fetched {
            events,
            redelivered: u32::try_from(redelivered).unwrap_or(u32::MAX),
            parked: u32::try_from(parked).unwrap_or(u32::MAX),
            next_due: next_due.map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    async fn ack_events(&self, name: &str, sequences: &[u64]) -> Result<Acked, ConsumerError> {
        // One statement, no lock on the consumer's row: an ack is a delete
        // of rows by key (two acks of one event: the second deletes
        // nothing), so acks do not queue behind each other or behind
        // fetches. Nothing is deleted if any sequence was never delivered.
        let sequences: Vec<i64> = sequences.iter().map(|&s| to_sql(s)).collect();
        let row = sqlx::query(
            "WITH q AS (SELECT kind, delivered_sequence FROM consumers WHERE name = $1), \
             d AS (DELETE FROM consumer_pending p USING q \
                   WHERE q.kind = 'work_queue' AND p.consumer = $1 AND p.sequence = ANY($2) \
                     AND (SELECT MAX(s) FROM UNNEST($2::bigint[]) s) <= q.delivered_sequence \
                   RETURNING p.sequence), \
             u AS (UPDATE consumers SET last_ack_at = now(), updated_at = now() \
                   WHERE name = $1 AND EXISTS (SELECT 1 FROM d)) \
             SELECT q.kind, q.delivered_sequence, (SELECT COUNT(*) FROM d), \
               (SELECT MIN(sequence) FROM consumer_pending \
                WHERE consumer = $1 AND sequence NOT IN (SELECT sequence FROM d)) \
             FROM q",
        )
        .bind(name)
        .bind(&sequences)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?
        .ok_or_else(|| ConsumerError::NotFound(name.to_owned()))?;
        work_queue(&row, name)?;
        let delivered = from_sql(row.try_get(1).map_err(backend)?);
        if let Some(&sequence) = sequences.iter().find(|&&s| from_sql(s) > delivered) {
            return Err(ConsumerError::NotDelivered {
                name: name.to_owned(),
                sequence: from_sql(sequence),
            });
        }
        let newly: i64 = row.try_get(2).map_err(backend)?;
        let oldest: Option<i64> = row.try_get(3).map_err(backend)?;
        Ok(Acked {
            acked_sequence: oldest.map_or(delivered, |s| from_sql(s).saturating_sub(1)),
            newly_acked: u32::try_from(newly).unwrap_or(u32::MAX),
        })
    }

    async fn nak(
        &self,
        name: &str,
        sequences: &[u64],
        delivery_counts: Option<&[u32]>,
        delay: Duration,
    ) -> Result<u32, ConsumerError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        lock_queue(&mut tx, name).await?;
        let sequences: Vec<i64> = sequences.iter().map(|&s| to_sql(s)).collect();
        // -1: any delivery.
        let counts: Vec<i32> = match delivery_counts {
            Some(c) => c
                .iter()
                .map(|&c| i32::try_from(c).unwrap_or(i32::MAX))
                .collect(),
            None => vec![-1; sequences.len()],
        };
        let nakked = sqlx::query(
            "UPDATE consumer_pending p SET leased_until = CASE WHEN p.deliveries_left = 0 \
               THEN now() ELSE now() + $4::float8 * interval '1 millisecond' END \
             FROM UNNEST($2::bigint[], $3::int[]) AS n(sequence, delivery_count) \
             WHERE p.consumer = $1 AND p.sequence = n.sequence AND p.leased_until > now() \
               AND (n.delivery_count = -1 OR p.delivery_count = n.delivery_count)",
        )
        .bind(name)
        .bind(&sequences)
        .bind(&counts)
        .bind(millis(delay) as f64)
        .execute(&mut *tx)
        .await
        .map_err(backend)?
        .rows_affected();
        tx.commit().await.map_err(backend)?;
        Ok(u32::try_from(nakked).unwrap_or(u32::MAX))
    }

    async fn redrive(&self, name: &str, sequences: &[u64]) -> Result<u32, ConsumerError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let q = lock_queue(&mut tx, name).await?;
        let sequences: Vec<i64> = sequences.iter().map(|&s| to_sql(s)).collect();
        let redriven = sqlx::query(
            "UPDATE consumer_pending SET deliveries_left = $2, parked_at = NULL, \
               leased_until = now() \
             WHERE consumer = $1 AND deliveries_left = 0 AND leased_until <= now() \
               AND (cardinality($3::bigint[]) = 0 OR sequence = ANY($3))",
        )
        .bind(name)
        .bind(q.max_deliver)
        .bind(&sequences)
        .execute(&mut *tx)
        .await
        .map_err(backend)?
        .rows_affected();
        tx.commit().await.map_err(backend)?;
        Ok(u32::try_from(redriven).unwrap_or(u32::MAX))
    }
}
