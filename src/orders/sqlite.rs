//! The ledger in the SQLite store's file (its `orders` table, created by
//! the store's migrations), on a connection of its own. SQLite has one
//! writer at a time: `begin` takes the write lock first (BEGIN IMMEDIATE),
//! which serializes it with every other writer, the notification writer
//! included, and commits (an fsync) only when it changed something: an
//! answer from the ledger costs a read.

use std::{path::Path, time::Duration};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{Begin, Order, OrderState, OrderStore, OrderTerms, Outcome, Refusal, Write, decide};
use crate::store::{SideConnection, StoreError};

pub struct SqliteOrders {
    conn: SideConnection,
}

const COLUMNS: &str = "out_trade_id, amount_fen, openid, expires_at_ms, created_at_ms, state, \
     response_text, params_at_ms, failure_code, failure_message, paid_sequence, attempts, \
     claimed_by, claimed_until_ms";

impl SqliteOrders {
    /// Opens the ledger of the store at `path` (already migrated).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            conn: SideConnection::open(path)?,
        })
    }
}

fn ms(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn row_to_order(r: &Row<'_>) -> rusqlite::Result<Order> {
    let state: String = r.get(5)?;
    let failure = match (r.get::<_, Option<String>>(8)?, r.get(9)?) {
        (Some(code), Some(message)) => Some((code, message)),
        _ => None,
    };
    let claim = match (
        r.get::<_, Option<String>>(12)?,
        r.get::<_, Option<i64>>(13)?,
    ) {
        (Some(by), Some(until)) => Some((by, at(until))),
        _ => None,
    };
    Ok(Order {
        out_trade_id: r.get(0)?,
        amount_fen: r.get(1)?,
        openid: r.get(2)?,
        expires_at: at(r.get(3)?),
        created_at: at(r.get(4)?),
        state: OrderState::parse(&state).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
        })?,
        response_text: r.get(6)?,
        params_at: r.get::<_, Option<i64>>(7)?.map(at),
        failure,
        paid_sequence: r
            .get::<_, Option<i64>>(10)?
            .map(|s| u64::try_from(s).unwrap_or(0)),
        attempts: r.get(11)?,
        claim,
    })
}

fn select(conn: &Connection, id: &str) -> rusqlite::Result<Option<Order>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM orders WHERE out_trade_id = ?1"
    ))?
    .query_row([id], row_to_order)
    .optional()
}

/// The stored order, or the refusal its tombstone gives when retention
/// deleted it.
fn select_or_swept(
    conn: &Connection,
    id: &str,
) -> rusqlite::Result<Result<Option<Order>, Refusal>> {
    if let Some(order) = select(conn, id)? {
        return Ok(Ok(Some(order)));
    }
    let paid: Option<bool> = conn
        .prepare_cached("SELECT paid FROM swept_orders WHERE out_trade_id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    Ok(paid.map_or(Ok(None), |paid| Err(Refusal::swept(paid))))
}

#[async_trait::async_trait]
impl OrderStore for SqliteOrders {
    async fn begin(
        &self,
        terms: &OrderTerms,
        now: DateTime<Utc>,
        prepay_ttl: Duration,
        waited: Option<u32>,
        claimant: &str,
        claim_until: DateTime<Utc>,
    ) -> Result<Begin, StoreError> {
        let (terms, claimant) = (terms.clone(), claimant.to_owned());
        self.conn
            .with(move |conn| {
                // A read first: most repeats need no write, and no lock.
                let stored = match select_or_swept(conn, &terms.out_trade_id)? {
                    Ok(stored) => stored,
                    Err(refusal) => return Ok(Begin::Refused(refusal)),
                };
                let (begin, write) = decide(stored.as_ref(), &terms, now, prepay_ttl, waited);
                if write.is_none() {
                    return Ok(begin);
                }
                // A write: decide again under the write lock.
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let stored = match select_or_swept(&tx, &terms.out_trade_id)? {
                    Ok(stored) => stored,
                    Err(refusal) => return Ok(Begin::Refused(refusal)),
                };
                let (begin, write) = decide(stored.as_ref(), &terms, now, prepay_ttl, waited);
                match write {
                    None => return Ok(begin),
                    Some(Write::Insert) => {
                        tx.execute(
                            "INSERT INTO orders (out_trade_id, amount_fen, openid, expires_at_ms, \
                         created_at_ms, state, attempts, claimed_by, claimed_until_ms, \
                         updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, 'UNKNOWN', 1, ?6, ?7, ?5)",
                            params![
                                terms.out_trade_id,
                                terms.amount_fen,
                                terms.openid,
                                ms(terms.expires_at),
                                ms(now),
                                claimant,
                                ms(claim_until)
                            ],
                        )?;
                    }
                    Some(Write::Claim { attempt }) => {
                        tx.execute(
                        "UPDATE orders SET attempts = ?2, claimed_by = ?3, claimed_until_ms = ?4, \
                         updated_at_ms = ?5 WHERE out_trade_id = ?1",
                        params![
                            terms.out_trade_id,
                            attempt,
                            claimant,
                            ms(claim_until),
                            ms(now)
                        ],
                    )?;
                    }
                }
                tx.commit()?;
                Ok(begin)
            })
            .await
    }

    async fn finish(
        &self,
        out_trade_id: &str,
        claimant: &str,
        attempt: u32,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (id, claimant, outcome) = (
            out_trade_id.to_owned(),
            claimant.to_owned(),
            outcome.clone(),
        );
        self.conn
            .with(move |conn| {
                let (state, response_text, code, message) = outcome.columns();
                let params_at = response_text.map(|_| ms(now));
                // A PAID order stays PAID; pay parameters are replaced only by
                // newer ones.
                conn.execute(
                    "UPDATE orders SET \
                   state = CASE WHEN state = 'PAID' THEN 'PAID' ELSE ?4 END, \
                   response_text = COALESCE(?5, response_text), \
                   params_at_ms = COALESCE(?6, params_at_ms), \
                   failure_code = ?7, failure_message = ?8, \
                   claimed_by = NULL, claimed_until_ms = NULL, updated_at_ms = ?9 \
                 WHERE out_trade_id = ?1 AND claimed_by = ?2 AND attempts = ?3",
                    params![
                        id,
                        claimant,
                        attempt,
                        state,
                        response_text,
                        params_at,
                        code,
                        message,
                        ms(now)
                    ],
                )?;
                Ok(())
            })
            .await
    }

    async fn get(&self, out_trade_id: &str) -> Result<Option<Order>, StoreError> {
        let id = out_trade_id.to_owned();
        self.conn.with(move |conn| select(conn, &id)).await
    }

    async fn list(
        &self,
        state: Option<OrderState>,
        after: Option<(DateTime<Utc>, String)>,
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<Order>, StoreError> {
        self.conn
            .with(move |conn| {
                // EXPIRED is what readers see past `expires_at` unpaid.
                let filter = match state {
                    None => "1",
                    Some(OrderState::Expired) => "state <> 'PAID' AND expires_at_ms <= ?3",
                    Some(OrderState::Paid) => "state = 'PAID'",
                    Some(_) => "state = ?4 AND expires_at_ms > ?3",
                };
                let (after_ms, after_id) =
                    after.map_or((i64::MAX, String::new()), |(t, id)| (ms(t), id));
                let sql = format!(
                    "SELECT {COLUMNS} FROM orders \
                 WHERE (created_at_ms < ?1 OR (created_at_ms = ?1 AND out_trade_id < ?2)) \
                   AND {filter} AND ?3 = ?3 AND ?4 = ?4 \
                 ORDER BY created_at_ms DESC, out_trade_id DESC LIMIT ?5"
                );
                let after_id = if after_ms == i64::MAX {
                    "\u{10FFFF}".to_owned()
                } else {
                    after_id
                };
                let mut stmt = conn.prepare_cached(&sql)?;
                stmt.query_map(
                    params![
                        after_ms,
                        after_id,
                        ms(now),
                        state.map_or("", OrderState::as_str),
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    row_to_order,
                )?
                .collect()
            })
            .await
    }
}
