//! A fresh PostgreSQL database per test, on the server named by
//! `KONGTIE_TEST_DATABASE_URL` (default: the local one, user `postgres`).
//! A server that does not answer fails the test with what to do; it is
//! never skipped.

use std::sync::{
    OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use sqlx::{AssertSqlSafe, Connection, PgConnection};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PREFIX: &str = "kongtie_test_";

fn server_url() -> String {
    std::env::var("KONGTIE_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap_or_else(|e| {
        panic!(
            "these tests need PostgreSQL, and {url} does not answer ({e}). Start it \
             (`pg_ctlcluster --skip-systemctl-redirect 15 main start`) or set \
             KONGTIE_TEST_DATABASE_URL to a server where this user may CREATE DATABASE."
        )
    })
}

/// A database of its own, dropped when this is.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let server = server_url();
        let mut conn = connect(&server).await;
        sweep_leftovers(&mut conn).await;
        let name = format!(
            "{PREFIX}{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        let mut url = url::Url::parse(&server).unwrap();
        url.set_path(&name);
        PgDatabase {
            url: url.to_string(),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside a test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&server_url()).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await;
                }
            });
        })
        .join();
    }
}

/// Drops databases left by test processes that no longer run (killed
/// before their `Drop`), once per process.
async fn sweep_leftovers(conn: &mut PgConnection) {
    static SWEPT: OnceLock<()> = OnceLock::new();
    if SWEPT.set(()).is_err() {
        return;
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'kongtie_test_%'")
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    for name in names {
        let pid = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let gone = pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
        if gone {
            let quoted = name.replace('"', "\"\"");
            let sql = format!("DROP DATABASE IF EXISTS \"{quoted}\" WITH (FORCE)");
            let _ = sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await;
        }
    }
}
