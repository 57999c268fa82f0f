//! `kongtie-gateway check`: what an operator runs before `serve`. It checks
//! the configuration exactly as `serve` would (the same code path), opens
//! the store, and makes one signed GetAccessToken call, printing one line
//! per check; a failure says what to look at.

use std::time::Instant;

use tokio::net::TcpListener;

use crate::{
    config::ServeArgs,
    error::Error,
    sandbox::SandboxHandle,
    startup::{BoxError, load_api_keys, load_tls},
    store,
    upstream::KongtieClient,
};

/// One check's result: `Ok(what was seen)` or `Err(what is wrong)`.
type Outcome = Result<String, String>;

/// Runs every check, printing each; true when all passed.
pub async fn run(args: &ServeArgs) -> bool {
    let mut all_ok = true;
    let mut report = |name: &str, outcome: Outcome| {
        match &outcome {
            Ok(seen) => println!("ok    {name}: {seen}"),
            Err(why) => println!("FAIL  {name}: {why}"),
        }
        all_ok &= outcome.is_ok();
    };

    let mut config = match args.config() {
        Ok(config) => config,
        Err(why) => {
            report("configuration", Err(why));
            return false;
        }
    };
    report("configuration", Ok(describe_config(args)));
    report(
        "API keys",
        load_api_keys(&config.access)
            .map(|keys| format!("{} configured", keys.len()))
            .map_err(|e| e.to_string()),
    );
    report(
        "TLS",
        load_tls(&config.access)
            .await
            .map(|tls| if tls.is_some() { "on" } else { "off" }.to_owned())
            .map_err(|e| e.to_string()),
    );
    report("store", check_store(&config.store_url).await);

    // With --sandbox the call goes to a sandbox of its own on a free port,
    // so `check` can run beside a gateway that holds the configured one.
    let mut sandbox = None;
    if let Some((_, sandbox_config)) = config.sandbox.take() {
        match spawn_sandbox(sandbox_config).await {
            Ok(handle) => {
                config.upstream.ktapi_url = handle.ktapi_url();
                config.upstream.pay_url = handle.pay_url();
                sandbox = Some(handle);
            }
            Err(e) => report("sandbox", Err(e.to_string())),
        }
    }
    report(
        "Kongtie GetAccessToken",
        check_upstream(config.upstream.clone()).await,
    );
    if let Some(sandbox) = sandbox {
        sandbox.shutdown().await;
    }
    all_ok
}

fn describe_config(args: &ServeArgs) -> String {
    if args.sandbox {
        "valid (sandbox upstream)".to_owned()
    } else {
        format!("valid (ktapi {}, pay {})", args.ktapi_url, args.pay_url)
    }
}

async fn check_store(url: &str) -> Outcome {
    let store = store::open(url, None).await.map_err(|e| e.to_string())?;
    let last = store.last_sequence().await;
    store.close().await;
    let kind = if url.starts_with("sqlite") {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    last.map(|last| format!("{kind} opened, last sequence {last}"))
        .map_err(|e| e.to_string())
}

async fn spawn_sandbox(config: crate::sandbox::SandboxConfig) -> Result<SandboxHandle, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(SandboxHandle::spawn(config, listener)?)
}

async fn check_upstream(upstream: crate::upstream::UpstreamConfig) -> Outcome {
    let client = KongtieClient::new(upstream, None).map_err(|e| e.to_string())?;
    let started = Instant::now();
    match client.get_access_token(None).await {
        Ok(_) => Ok(format!("answered in {} ms", started.elapsed().as_millis())),
        Err(e @ Error::UpstreamSignatureRejected { endpoint, .. }) => {
            Err(format!("{e}; check {}", endpoint.signing_settings()))
        }
        Err(e) => Err(e.to_string()),
    }
}
