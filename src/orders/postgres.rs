//! The ledger in PostgreSQL (migration `0002_orders.sql`), shared by every
//! replica. `begin` serializes on a transaction-scoped advisory lock keyed
//! by the order id, taken before the row is read, so that two replicas
//! cannot both find "no order" and both send it; answers that need no
//! write commit nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row, postgres::PgRow};

use super::{Begin, Order, OrderState, OrderStore, OrderTerms, Outcome, Refusal, Write, decide};
use crate::store::StoreError;

pub struct PostgresOrders {
    pool: PgPool,
}

impl PostgresOrders {
    /// The ledger on the store's pool (its migrations already applied).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

const COLUMNS: &str = "out_trade_id, amount_fen, openid, expires_at, created_at, state, \
     response_text, params_at, failure_code, failure_message, paid_sequence, attempts, \
     claimed_by, claimed_until";

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn row_to_order(r: &PgRow) -> Result<Order, StoreError> {
    let get_err = |e: sqlx::Error| backend(e);
    let failure = match (
        r.try_get::<Option<String>, _>(8).map_err(get_err)?,
        r.try_get::<Option<String>, _>(9).map_err(get_err)?,
    ) {
        (Some(code), Some(message)) => Some((code, message)),
        _ => None,
    };
    let claim = match (
        r.try_get::<Option<String>, _>(12).map_err(get_err)?,
        r.try_get::<Option<DateTime<Utc>>, _>(13).map_err(get_err)?,
    ) {
        (Some(by), Some(until)) => Some((by, until)),
        _ => None,
    };
    Ok(Order {
        out_trade_id: r.try_get(0).map_err(get_err)?,
        amount_fen: r.try_get(1).map_err(get_err)?,
        openid: r.try_get(2).map_err(get_err)?,
        expires_at: r.try_get(3).map_err(get_err)?,
        created_at: r.try_get(4).map_err(get_err)?,
        state: OrderState::parse(&r.try_get::<String, _>(5).map_err(get_err)?)?,
        response_text: r.try_get(6).map_err(get_err)?,
        params_at: r.try_get(7).map_err(get_err)?,
        failure,
        paid_sequence: r
            .try_get::<Option<i64>, _>(10)
            .map_err(get_err)?
            .map(|s| u64::try_from(s).unwrap_or(0)),
        attempts: u32::try_from(r.try_get::<i32, _>(11).map_err(get_err)?).unwrap_or(0),
        claim,
    })
}

async fn select(conn: &mut sqlx::PgConnection, id: &str) -> Result<Option<Order>, StoreError> {
    select_with(conn, id, "").await
}

/// `lock`: empty, or a row-locking clause (only constants go into the text).
async fn select_with(
    conn: &mut sqlx::PgConnection,
    id: &str,
    lock: &'static str,
) -> Result<Option<Order>, StoreError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders WHERE out_trade_id = $1 {lock}"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(backend)?
    .as_ref()
    .map(row_to_order)
    .transpose()
}

/// The stored order, or the refusal its tombstone gives when retention
/// deleted it. The tombstone is read after the order: a sweep that commits
/// between the two reads is seen by the second. `lock` as in `select_with`:
/// in a transaction that writes the row, `FOR UPDATE`, so that a sweep
/// deleting it now is waited for and its tombstone seen, rather than the
/// write finding no row and the order sent for an id retired meanwhile.
async fn select_or_swept(
    conn: &mut sqlx::PgConnection,
    id: &str,
    lock: &'static str,
) -> Result<Result<Option<Order>, Refusal>, StoreError> {
    if let Some(order) = select_with(&mut *conn, id, lock).await? {
        return Ok(Ok(Some(order)));
    }
    let paid: Option<bool> =
        sqlx::query_scalar("SELECT paid FROM swept_orders WHERE out_trade_id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(backend)?;
    Ok(paid.map_or(Ok(None), |paid| Err(Refusal::swept(paid))))
}

#[async_trait::async_trait]
impl OrderStore for PostgresOrders {
    async fn begin(
        &self,
        terms: &OrderTerms,
        now: DateTime<Utc>,
        prepay_ttl: Duration,
        waited: Option<u32>,
        claimant: &str,
        claim_until: DateTime<Utc>,
    ) -> Result<Begin, StoreError> {
        // A read first: most repeats need no write, and no lock.
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let stored = match select_or_swept(&mut conn, &terms.out_trade_id, "").await? {
            Ok(stored) => stored,
            Err(refusal) => return Ok(Begin::Refused(refusal)),
        };
        let (begin, write) = decide(stored.as_ref(), terms, now, prepay_ttl, waited);
        if write.is_none() {
            return Ok(begin);
        }
        drop(conn);
        let mut tx = self.pool.begin().await.map_err(backend)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('kongtie.order:' || $1, 0))")
            .bind(&terms.out_trade_id)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let stored = match select_or_swept(&mut tx, &terms.out_trade_id, "FOR UPDATE").await? {
            Ok(stored) => stored,
            Err(refusal) => return Ok(Begin::Refused(refusal)),
        };
        let (begin, write) = decide(stored.as_ref(), terms, now, prepay_ttl, waited);
        match write {
            None => return Ok(begin),
            Some(Write::Insert) => {
                sqlx::query(
                    "INSERT INTO orders (out_trade_id, amount_fen, openid, expires_at, \
                     created_at, state, attempts, claimed_by, claimed_until, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, 'UNKNOWN', 1, $6, $7, $5)",
                )
                .bind(&terms.out_trade_id)
                .bind(terms.amount_fen)
                .bind(&terms.openid)
                .bind(terms.expires_at)
                .bind(now)
                .bind(claimant)
                .bind(claim_until)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            }
            Some(Write::Claim { attempt }) => {
                sqlx::query(
                    "UPDATE orders SET attempts = $2, claimed_by = $3, claimed_until = $4, \
                     updated_at = $5 WHERE out_trade_id = $1",
                )
                .bind(&terms.out_trade_id)
                .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
                .bind(claimant)
                .bind(claim_until)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            }
        }
        tx.commit().await.map_err(backend)?;
        Ok(begin)
    }

    async fn finish(
        &self,
        out_trade_id: &str,
        claimant: &str,
        attempt: u32,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (state, response_text, code, message) = outcome.columns();
        let params_at = response_text.map(|_| now);
        // A PAID order stays PAID; pay parameters are replaced only by newer
        // ones.
        sqlx::query(
            "UPDATE orders SET \
               state = CASE WHEN state = 'PAID' THEN 'PAID' ELSE $4 END, \
               response_text = COALESCE($5, response_text), \
               params_at = COALESCE($6, params_at), \
               failure_code = $7, failure_message = $8, \
               claimed_by = NULL, claimed_until = NULL, updated_at = $9 \
             WHERE out_trade_id = $1 AND claimed_by = $2 AND attempts = $3",
        )
        .bind(out_trade_id)
        .bind(claimant)
        .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
        .bind(state)
        .bind(response_text)
        .bind(params_at)
        .bind(code)
        .bind(message)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn get(&self, out_trade_id: &str) -> Result<Option<Order>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        select(&mut conn, out_trade_id).await
    }

    async fn list(
        &self,
        state: Option<OrderState>,
        after: Option<(DateTime<Utc>, String)>,
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<Order>, StoreError> {
        // EXPIRED is what readers see past `expires_at` unpaid.
        let filter = match state {
            None => "true",
            Some(OrderState::Expired) => "state <> 'PAID' AND expires_at <= $3",
            Some(OrderState::Paid) => "state = 'PAID'",
            Some(_) => "state = $4 AND expires_at > $3",
        };
        let (after_at, after_id) = match after {
            Some((t, id)) => (Some(t), id),
            None => (None, String::new()),
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM orders \
             WHERE ($1::timestamptz IS NULL OR (created_at, out_trade_id) < ($1, $2)) \
               AND {filter} AND $3::timestamptz IS NOT NULL AND $4::text IS NOT NULL \
             ORDER BY created_at DESC, out_trade_id DESC LIMIT $5"
        )))
        .bind(after_at)
        .bind(after_id)
        .bind(now)
        .bind(state.map_or("", OrderState::as_str))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.iter().map(row_to_order).collect()
    }
}
