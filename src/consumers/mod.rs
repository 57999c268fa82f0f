//! Durable consumers: who reads the notifications, how far each has
//! acknowledged, and how far behind it is. Today every consumer is a
//! cursor (a cumulative position moved by `AckNotifications`, created by its
//! first acknowledgement); the [`ConsumerStore`] trait is where the kinds
//! to come will live. One backend per database, held to one test suite.

mod postgres;
mod sqlite;

use chrono::{DateTime, Utc};

pub use postgres::PostgresConsumers;
pub use sqlite::SqliteConsumers;

use crate::store::StoreError;

/// A consumer as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub name: String,
    /// Every event up to this sequence is acknowledged.
    pub acked_sequence: u64,
    /// Stored events after `acked_sequence`: how far behind it is.
    pub lag: u64,
    /// When it last acknowledged.
    pub last_ack_at: DateTime<Utc>,
}

/// The consumers' storage: one implementation per database.
#[async_trait::async_trait]
pub trait ConsumerStore: Send + Sync + 'static {
    async fn get(&self, name: &str) -> Result<Option<Consumer>, StoreError>;

    /// Up to `limit` consumers in name order, after `after`.
    async fn list(&self, after: &str, limit: usize) -> Result<Vec<Consumer>, StoreError>;

    /// Forgets a consumer (its next subscription starts from the first
    /// event); false when there was none.
    async fn delete(&self, name: &str) -> Result<bool, StoreError>;
}
