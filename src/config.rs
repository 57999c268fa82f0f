//! Configuration: clap flags, each with an environment variable, checked at
//! start-up so a bad value stops the process with a clear message.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{grpc::listener::ConnectionPolicy, retention::RetentionPolicy};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::{
    gateway::GatewaySettings,
    grpc::origin::{self, AllowedHost, AllowedOrigin, OriginPolicy},
    notify::NotifySettings,
    orders::LedgerSettings,
    sandbox::{DEFAULT_RESEND_DELAYS, SandboxConfig},
    upstream::{Credentials, PayFixed, UpstreamConfig},
};

/// The token the Kongtie document gives its partners.
pub const DOCUMENT_TOKEN: &str = "#wugf543sxcv5*$#";
/// The WeChat app id the sandbox uses (the one in the document's example).
pub const SANDBOX_WECHAT_APP_ID: &str = "wx555b169abb4d62ce";

#[derive(Debug, Parser)]
#[command(
    name = "kongtie-gateway",
    version,
    about = "A typed gRPC gateway in front of the Kongtie WeChat official-account API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(Box<ServeArgs>),
    /// Run only the sandbox simulator of the Kongtie upstream.
    Sandbox(Box<SandboxArgs>),
    /// Check a configuration as `serve` would, and every credential and
    /// setting that can be tried without side effects; one line per item
    /// (ok, FAILED or not verified, and how), non-zero exit on a failure.
    Check(Box<CheckArgs>),
    /// Copy the SQLite store, consistent, while the gateway runs: the copy
    /// holds every notification stored before it began.
    Backup(BackupArgs),
}

/// `check`: the settings of `serve`, and what more may be tried.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Also create one real order of 0.01 yuan for this openid, expiring a
    /// minute later, to prove the pay token: only a real ParTrade can. It
    /// is never paid unless that user pays it within the minute.
    #[arg(long, value_name = "OPENID", value_parser = openid)]
    pub order: Option<String>,
}

fn openid(s: &str) -> Result<String, String> {
    crate::domain::OpenId::parse(s).map(|_| s.to_owned())
}

impl Cli {
    /// The command line and environment, parsed; on a bad value, prints
    /// where it came from and exits (as clap's own `parse` does).
    pub fn parse_naming_sources() -> Self {
        Self::try_parse_naming_sources(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses as [`Parser::try_parse_from`] does, but a bad value read from
    /// an environment variable is named by the variable, not by the flag
    /// the user never typed, and a missing one names its variable too.
    pub fn try_parse_naming_sources<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let mut command = Self::command();
        let parsed = command
            .try_get_matches_from_mut(&args)
            .and_then(|matches| Self::from_arg_matches(&matches));
        parsed.map_err(|e| name_the_source(e, &args).format(&mut command))
    }
}

/// Rewrites a clap error about one setting so that it names the
/// environment variable when that is where the value came from. clap names
/// the flag whatever the source; which one it was is found by parsing
/// again with the variable of that argument ignored: the same error again
/// means the command line gave the value (it wins over the environment),
/// another outcome means the variable did.
fn name_the_source(mut error: clap::Error, args: &[std::ffi::OsString]) -> clap::Error {
    use clap::{
        CommandFactory,
        error::{ContextKind, ContextValue, ErrorKind},
    };
    // An argument shows as clap shows it only once its command is built.
    let mut built = Cli::command();
    built.build();
    let shown = |arg: &clap::Arg| arg.to_string();
    let find = |display: &str| {
        built
            .get_subcommands()
            .flat_map(|sub| sub.get_arguments())
            .find(|arg| shown(arg) == display)
            .cloned()
    };
    match error.kind() {
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => {
            let Some(ContextValue::String(display)) = error.get(ContextKind::InvalidArg) else {
                return error;
            };
            let Some(arg) = find(display) else {
                return error;
            };
            let Some(var) = arg.get_env().map(|v| v.to_string_lossy().into_owned()) else {
                return error;
            };
            if std::env::var_os(&var).is_none() || same_error_without_env(&error, &arg, args) {
                return error;
            }
            let flag = display.split(' ').next().unwrap_or(display).to_owned();
            error.insert(ContextKind::InvalidArg, ContextValue::String(var.clone()));
            if arg.is_hide_env_values_set() {
                error.insert(
                    ContextKind::InvalidValue,
                    ContextValue::String("<hidden>".into()),
                );
            }
            error.insert(
                ContextKind::Suggested,
                ContextValue::StyledStrs(vec![
                    format!("{var} is read from the environment; its flag is {flag}").into(),
                ]),
            );
            error
        }
        ErrorKind::MissingRequiredArgument => {
            let Some(ContextValue::Strings(missing)) = error.get(ContextKind::InvalidArg) else {
                return error;
            };
            let named = missing
                .iter()
                .map(
                    |display| match find(display).as_ref().and_then(clap::Arg::get_env) {
                        Some(var) => format!("{display} (or {})", var.to_string_lossy()),
                        None => display.clone(),
                    },
                )
                .collect();
            error.insert(ContextKind::InvalidArg, ContextValue::Strings(named));
            error
        }
        _ => error,
    }
}

/// Whether parsing `args` with `arg`'s environment variable ignored fails
/// the same way: then the value at fault was on the command line.
fn same_error_without_env(
    error: &clap::Error,
    arg: &clap::Arg,
    args: &[std::ffi::OsString],
) -> bool {
    use clap::{CommandFactory, error::ContextKind};
    let id = arg.get_id().clone();
    // A command not yet built: one built once may not be changed.
    let mut without = Cli::command();
    let names: Vec<String> = without
        .get_subcommands()
        .filter(|sub| sub.get_arguments().any(|a| *a.get_id() == id))
        .map(|sub| sub.get_name().to_owned())
        .collect();
    for name in names {
        without = without.mut_subcommand(name, |sub| sub.mut_arg(id.clone(), |a| a.env(None)));
    }
    match without.try_get_matches_from(args) {
        Ok(_) => false,
        Err(again) => {
            again.kind() == error.kind()
                && [ContextKind::InvalidArg, ContextKind::InvalidValue]
                    .into_iter()
                    .all(|kind| again.get(kind) == error.get(kind))
        }
    }
}

/// Where the store is: shared by `serve`, `check` and `backup`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Directory of the local store.
    #[arg(long, env = "KONGTIE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Notification store URL: sqlite://PATH (default:
    /// sqlite://DATA_DIR/notifications.db) or postgres://... (may hold a
    /// password: never shown).
    #[arg(long, env = "KONGTIE_STORE", hide_env_values = true, value_parser = secret)]
    pub store: Option<SecretString>,
}

impl StoreArgs {
    pub fn url(&self) -> String {
        self.store.as_ref().map_or_else(
            || {
                format!(
                    "sqlite://{}",
                    self.data_dir.join("notifications.db").display()
                )
            },
            |url| url.expose_secret().to_owned(),
        )
    }
}

#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Where to write the copy (a new file).
    pub path: PathBuf,
}

/// Checks a retention duration; [`crate::retention::parse_duration`]
/// reads it.
fn retention_duration(s: &str) -> Result<String, String> {
    crate::retention::parse_duration(s).map(|_| s.to_owned())
}

fn sweep_every(s: &str) -> Result<Duration, String> {
    crate::retention::parse_duration(s)?.ok_or_else(|| "must be more than 0".to_owned())
}

/// How to talk to Kongtie: shared by the gateway and the sandbox, so the
/// same environment makes the two agree.
#[derive(Debug, Clone, Args)]
pub struct KongtieArgs {
    /// Signing token of the three ktapi calls and of payment notifications
    /// (required by `serve` without --sandbox).
    #[arg(long, env = "KONGTIE_TOKEN", hide_env_values = true, value_parser = secret)]
    pub token: Option<SecretString>,
    /// Signing token of ParTrade (defaults to KONGTIE_TOKEN).
    #[arg(long, env = "KONGTIE_PAY_TOKEN", hide_env_values = true, value_parser = secret)]
    pub pay_token: Option<SecretString>,
    /// SourceFrom of the ktapi calls.
    #[arg(long, env = "KONGTIE_SOURCE_FROM", default_value = "JSJ", value_parser = non_empty)]
    pub source_from: String,
    /// SourceFrom of ParTrade.
    #[arg(long, env = "KONGTIE_PAY_SOURCE_FROM", default_value = "600", value_parser = non_empty)]
    pub pay_source_from: String,
    /// ParTrade fixed value PlatformAppId.
    #[arg(long, env = "KONGTIE_PLATFORM_APP_ID", default_value = "wssccaf9-2341-1234-87c1-6ababc10aab3", value_parser = non_empty)]
    pub platform_app_id: String,
    /// ParTrade fixed value PlatformToken.
    #[arg(long, env = "KONGTIE_PLATFORM_TOKEN", default_value = "wsscr6zfppd8v46b5678f8fxh2xdhv0d22xlx08h8btn6ttxxx4aab3", hide_default_value = true, hide_env_values = true, value_parser = secret)]
    pub platform_token: SecretString,
    /// ParTrade fixed value SourceWay.
    #[arg(long, env = "KONGTIE_SOURCE_WAY", default_value = "20", value_parser = non_empty)]
    pub source_way: String,
    /// ParTrade fixed value SourceApp.
    #[arg(long, env = "KONGTIE_SOURCE_APP", default_value = "600", value_parser = non_empty)]
    pub source_app: String,
    /// ParTrade fixed value PayMethod.
    #[arg(long, env = "KONGTIE_PAY_METHOD", default_value = "22", value_parser = non_empty)]
    pub pay_method: String,
    /// Token payment notifications are signed with (defaults to
    /// KONGTIE_TOKEN, as the document's notify example is signed).
    #[arg(long, env = "KONGTIE_NOTIFY_TOKEN", hide_env_values = true, value_parser = secret)]
    pub notify_token: Option<SecretString>,
}

impl KongtieArgs {
    /// `KONGTIE_TOKEN`, or the document's token where none is set (only the
    /// sandbox gets that far without one: see [`ServeArgs::config`]).
    fn token(&self) -> SecretString {
        self.token
            .clone()
            .unwrap_or_else(|| SecretString::from(DOCUMENT_TOKEN))
    }

    pub fn ktapi(&self) -> Credentials {
        Credentials {
            source_from: self.source_from.clone(),
            token: self.token(),
        }
    }

    pub fn pay(&self) -> Credentials {
        Credentials {
            source_from: self.pay_source_from.clone(),
            token: self.pay_token.clone().unwrap_or_else(|| self.token()),
        }
    }

    /// The document's notify example verifies with the ktapi token, not
    /// with the payment host's: notifications come from Kongtie's side.
    pub fn notify_token(&self) -> SecretString {
        self.notify_token.clone().unwrap_or_else(|| self.token())
    }

    /// Outside the sandbox: a token must be set, and must not be the one
    /// the public document prints (unless `allow_document_token`). Every
    /// problem found, not only the first.
    fn secret_problems(&self, allow_document_token: bool) -> Vec<String> {
        if self.token.is_none() {
            return vec![
                "KONGTIE_TOKEN is not set: give the signing token Kongtie issued you \
                 (--token), or run with --sandbox"
                    .into(),
            ];
        }
        if allow_document_token {
            return Vec::new();
        }
        [
            ("KONGTIE_TOKEN", self.token.as_ref()),
            ("KONGTIE_PAY_TOKEN", self.pay_token.as_ref()),
            ("KONGTIE_NOTIFY_TOKEN", self.notify_token.as_ref()),
        ]
        .into_iter()
        .filter(|(_, value)| value.is_some_and(|v| v.expose_secret() == DOCUMENT_TOKEN))
        .map(|(var, _)| {
            format!(
                "{var} is the token printed in Kongtie's public document: anyone who has \
                 read it could sign a notification; set the token Kongtie issued you, or \
                 KONGTIE_ALLOW_DOCUMENT_TOKEN=true (--allow-document-token) if Kongtie \
                 really issued you this one"
            )
        })
        .collect()
    }

    /// Every secret still holding the example file's placeholder.
    fn placeholder_problems(&self) -> Vec<String> {
        [
            ("KONGTIE_TOKEN", self.token.as_ref()),
            ("KONGTIE_PAY_TOKEN", self.pay_token.as_ref()),
            ("KONGTIE_NOTIFY_TOKEN", self.notify_token.as_ref()),
            ("KONGTIE_PLATFORM_TOKEN", Some(&self.platform_token)),
        ]
        .into_iter()
        .filter_map(|(var, value)| refuse_placeholder(var, value?.expose_secret()).err())
        .collect()
    }

    pub fn pay_fixed(&self) -> PayFixed {
        PayFixed {
            platform_app_id: self.platform_app_id.clone(),
            platform_token: self.platform_token.clone(),
            source_way: self.source_way.clone(),
            source_app: self.source_app.clone(),
            pay_method: self.pay_method.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the gRPC listener.
    #[arg(long, env = "KONGTIE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Base URL of the three ktapi calls.
    #[arg(long, env = "KONGTIE_KTAPI_URL", default_value = "http://s5.jsjinfo.cn/awkmanage/v3/ktapi", value_parser = http_url)]
    pub ktapi_url: Url,
    /// Full URL of ParTrade.ashx.
    #[arg(long, env = "KONGTIE_PAY_URL", default_value = "http://zs5.jsjinfo.cn/v5/ParTrade.ashx", value_parser = http_url)]
    pub pay_url: Url,
    #[command(flatten)]
    pub kongtie: KongtieArgs,
    /// Accept the token printed in Kongtie's public document as a signing
    /// token (only if Kongtie really issued it to you).
    #[arg(long, env = "KONGTIE_ALLOW_DOCUMENT_TOKEN")]
    pub allow_document_token: bool,
    /// The official account's WeChat app id (authorize URLs, wx.config).
    #[arg(long, env = "KONGTIE_WECHAT_APP_ID", value_parser = non_empty)]
    pub wechat_app_id: Option<String>,
    /// How long an access token or jsapi ticket is cached, in seconds.
    #[arg(long, env = "KONGTIE_CACHE_TTL_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=7000))]
    pub cache_ttl_secs: u64,
    /// Connect timeout to Kongtie, in milliseconds.
    #[arg(long, env = "KONGTIE_CONNECT_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub connect_timeout_ms: u64,
    /// Total timeout of one Kongtie call, in milliseconds.
    #[arg(long, env = "KONGTIE_UPSTREAM_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=120_000))]
    pub upstream_timeout_ms: u64,
    /// Expiry of an order that names none, in seconds from creation.
    #[arg(long, env = "KONGTIE_ORDER_TTL_SECS", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(60..=30 * 86_400))]
    pub order_ttl_secs: u64,
    /// How far ahead a request may set an order's expiry, in seconds.
    #[arg(long, env = "KONGTIE_ORDER_MAX_EXPIRY_SECS", default_value_t = 7 * 86_400, value_parser = clap::value_parser!(u64).range(60..=366 * 86_400))]
    pub order_max_expiry_secs: u64,
    /// How long stored pay parameters are answered again without asking
    /// Kongtie, in seconds (WeChat's prepay_id lives 7200).
    #[arg(long, env = "KONGTIE_PREPAY_TTL_SECS", default_value_t = 6600, value_parser = clap::value_parser!(u64).range(1..=7200))]
    pub prepay_ttl_secs: u64,
    /// How many orders a replica sends to Kongtie at once (each runs to
    /// its answer even when its caller has left); beyond, a new order is
    /// RESOURCE_EXHAUSTED (TOO_MANY_ORDERS_IN_FLIGHT).
    #[arg(long, env = "KONGTIE_MAX_ORDERS_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_orders_in_flight: u32,
    /// Largest amount an order may have, in fen.
    #[arg(long, env = "KONGTIE_MAX_AMOUNT_FEN", default_value_t = 100_000_000, value_parser = clap::value_parser!(i64).range(1..=1_000_000_000_000))]
    pub max_amount_fen: i64,
    /// Address of the payment notification listener.
    #[arg(long, env = "KONGTIE_NOTIFY_ADDR", default_value = "127.0.0.1:8080")]
    pub notify_addr: SocketAddr,
    /// Path the notification listener answers on.
    #[arg(long, env = "KONGTIE_NOTIFY_PATH", default_value = "/kongtie/payment-notify", value_parser = url_path)]
    pub notify_path: String,
    /// Largest notification body accepted, in bytes.
    #[arg(long, env = "KONGTIE_NOTIFY_MAX_BODY_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(512..=16 << 20))]
    pub notify_max_body_bytes: u64,
    #[command(flatten)]
    pub store: StoreArgs,
    /// How long notifications and final orders are kept, e.g. 400d, 12h;
    /// 0 keeps everything. An event no durable consumer has acknowledged
    /// is kept longer, up to KONGTIE_RETENTION_MAX.
    #[arg(long, env = "KONGTIE_RETENTION", default_value = "400d", value_parser = retention_duration)]
    pub retention: String,
    /// Past this, events go even if a consumer has not acknowledged them
    /// (default: twice KONGTIE_RETENTION; 0: never).
    #[arg(long, env = "KONGTIE_RETENTION_MAX", value_parser = retention_duration)]
    pub retention_max: Option<String>,
    /// How often the retention sweep runs (it also refreshes the store's
    /// size and first retained sequence in the metrics).
    #[arg(long, env = "KONGTIE_RETENTION_SWEEP_EVERY", default_value = "60s", value_parser = sweep_every)]
    pub retention_sweep_every: Duration,
    /// Test only, unsafe: accept a KONGTIE_RETENTION below the floor
    /// ([`crate::retention::RETENTION_FLOOR`]), so a test can watch a sweep
    /// within seconds. Hidden from `--help`; never set it in production.
    #[arg(long, env = "KONGTIE_UNSAFE_TEST_ONLY_SHORT_RETENTION", hide = true)]
    pub unsafe_test_only_short_retention: bool,
    /// Time a notify connection has to send a request's headers (from
    /// opening, or from its previous answer: idle connections end then), and
    /// then its body, in milliseconds.
    #[arg(long, env = "KONGTIE_NOTIFY_READ_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub notify_read_timeout_ms: u64,
    /// Connections the notify listener keeps open at once; past it, it stops
    /// accepting until one closes.
    #[arg(long, env = "KONGTIE_NOTIFY_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub notify_max_connections: u64,
    /// How long a notification may take from its whole body to its answer,
    /// store commit included, in milliseconds.
    #[arg(long, env = "KONGTIE_NOTIFY_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub notify_timeout_ms: u64,
    /// Notification requests handled at once; more get 503.
    #[arg(long, env = "KONGTIE_NOTIFY_MAX_CONCURRENCY", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub notify_max_concurrency: u64,
    /// Source networks allowed to notify, comma-separated CIDRs (default:
    /// any).
    #[arg(long, env = "KONGTIE_NOTIFY_ALLOW", value_delimiter = ',')]
    pub notify_allow: Vec<IpNet>,
    /// Proxies whose X-Forwarded-For is believed, comma-separated CIDRs.
    #[arg(long, env = "KONGTIE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpNet>,
    /// Refuse notifications whose TimeStamp is further than this many
    /// seconds from now (default: off; resends may carry the first one).
    #[arg(long, env = "KONGTIE_NOTIFY_MAX_AGE_SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub notify_max_age_secs: Option<u64>,
    /// API keys callers send as `authorization: Bearer <key>`,
    /// comma-separated.
    #[arg(
        long,
        env = "KONGTIE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (`#` starts a comment).
    #[arg(long, env = "KONGTIE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Serve gRPC without API keys on a non-loopback address.
    #[arg(long, env = "KONGTIE_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// Origins whose web pages may call the gRPC port (the Connect
    /// protocol from a browser), comma-separated, as browsers write them:
    /// https://shop.example, http://127.0.0.1:8000. A request with any
    /// other Origin is refused (403) before anything runs. Default: none.
    #[arg(long = "allowed-origin", env = "KONGTIE_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = origin::parse_origin)]
    pub allowed_origins: Vec<AllowedOrigin>,
    /// Without API keys, the host names the gRPC port answers besides
    /// loopback names and IP addresses, comma-separated (no port); a
    /// request for any other Host is refused (421: DNS rebinding). With API
    /// keys, every name is answered.
    #[arg(long = "allowed-host", env = "KONGTIE_ALLOWED_HOSTS", value_delimiter = ',', value_parser = origin::parse_host)]
    pub allowed_hosts: Vec<AllowedHost>,
    /// PEM certificate chain for gRPC over TLS (with --tls-key).
    #[arg(long, env = "KONGTIE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for gRPC over TLS (with --tls-cert).
    #[arg(long, env = "KONGTIE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: require client certificates signed by them
    /// (mutual TLS).
    #[arg(long, env = "KONGTIE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "KONGTIE_ADMIN_ADDR", default_value = "127.0.0.1:9090")]
    pub admin_addr: SocketAddr,
    /// After SIGTERM or SIGINT, how long in-flight work may take, in
    /// seconds.
    #[arg(long, env = "KONGTIE_SHUTDOWN_GRACE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace_secs: u64,
    /// gRPC connections (and subscriptions) are retired after about this
    /// many seconds, so clients rebalance across replicas; 0 turns it off.
    #[arg(long, env = "KONGTIE_MAX_CONNECTION_AGE_SECS", default_value_t = 1800)]
    pub max_connection_age_secs: u64,
    /// After its maximum age, the time a connection's streams have to
    /// finish before it is closed for good, stuck streams and all.
    #[arg(long, env = "KONGTIE_MAX_CONNECTION_AGE_GRACE_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub max_connection_age_grace_secs: u64,
    /// gRPC connections open at once; past it, new ones wait in the
    /// kernel's queue until one closes.
    #[arg(long, env = "KONGTIE_GRPC_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub grpc_max_connections: u32,
    /// Time a new gRPC connection has, in milliseconds, to finish its TLS
    /// handshake and send the HTTP/2 preface; then it is closed.
    #[arg(long, env = "KONGTIE_GRPC_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub grpc_handshake_timeout_ms: u64,
    /// Longest a call may take on the server, in milliseconds, from its
    /// headers to its answer (or, for a subscription, to its first
    /// message): past it, DEADLINE_EXCEEDED. It bounds a request body that
    /// stops arriving. A client's shorter `grpc-timeout` wins.
    #[arg(long, env = "KONGTIE_GRPC_CALL_TIMEOUT_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub grpc_call_timeout_ms: u64,
    /// Largest request message, in bytes; a larger one is
    /// RESOURCE_EXHAUSTED. Every request of these services is far smaller.
    #[arg(long, env = "KONGTIE_GRPC_MAX_MESSAGE_BYTES", default_value_t = 64 << 10, value_parser = clap::value_parser!(u32).range(1024..=(64 << 20)))]
    pub grpc_max_message_bytes: u32,
    /// Streams (calls and subscriptions) one gRPC connection may have open
    /// at once, advertised to clients in HTTP/2's SETTINGS
    /// (MAX_CONCURRENT_STREAMS); a client opens more on more connections.
    #[arg(long, env = "KONGTIE_GRPC_MAX_STREAMS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub grpc_max_streams: u32,
    /// Subscriptions the server holds at once; the one past it gets
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "KONGTIE_MAX_SUBSCRIPTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_subscriptions: u32,
    /// Subscriptions one connection may hold at once; the one past it gets
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "KONGTIE_MAX_SUBSCRIPTIONS_PER_CONNECTION", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_subscriptions_per_connection: u32,
    /// Run the sandbox simulator in-process and point the gateway at it.
    #[arg(long, env = "KONGTIE_SANDBOX")]
    pub sandbox: bool,
    /// Address of the in-process sandbox (with --sandbox).
    #[arg(long, env = "KONGTIE_SANDBOX_ADDR", default_value = "127.0.0.1:8090")]
    pub sandbox_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "KONGTIE_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Address of the simulator.
    #[arg(long, env = "KONGTIE_SANDBOX_ADDR", default_value = "127.0.0.1:8090")]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub kongtie: KongtieArgs,
    /// The WeChat app id put into pay parameters.
    #[arg(long, env = "KONGTIE_WECHAT_APP_ID", default_value = SANDBOX_WECHAT_APP_ID, value_parser = non_empty)]
    pub wechat_app_id: String,
    /// Where the simulator sends payment notifications.
    #[arg(long, env = "KONGTIE_SANDBOX_NOTIFY_URL", default_value = "http://127.0.0.1:8080/kongtie/payment-notify", value_parser = http_url)]
    pub notify_url: Url,
    /// Lifetime of a simulated access token or ticket, in seconds.
    #[arg(long, env = "KONGTIE_SANDBOX_TOKEN_LIFETIME_SECS", default_value_t = 7200, value_parser = clap::value_parser!(u64).range(1..))]
    pub token_lifetime_secs: u64,
    /// Log format.
    #[arg(long, env = "KONGTIE_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

impl SandboxArgs {
    /// The standalone simulator's configuration: it notifies
    /// `--notify-url`.
    pub fn sandbox_config(&self) -> SandboxConfig {
        SandboxConfig {
            notify_url: Some(self.notify_url.clone()),
            ..sandbox_config(
                &self.kongtie,
                self.wechat_app_id.clone(),
                Duration::from_secs(self.token_lifetime_secs),
            )
        }
    }
}

/// A sandbox that accepts what a gateway configured with `kongtie` sends.
pub fn sandbox_config(
    kongtie: &KongtieArgs,
    wechat_app_id: String,
    token_lifetime: Duration,
) -> SandboxConfig {
    SandboxConfig {
        ktapi_token: kongtie.ktapi().token,
        pay_token: kongtie.pay().token,
        pay_fixed: kongtie.pay_fixed(),
        wechat_app_id,
        token_lifetime,
        notify_url: None,
        notify_token: kongtie.notify_token(),
        resend_delays: DEFAULT_RESEND_DELAYS.to_vec(),
    }
}

/// Everything the gateway needs, checked.
/// Who may call the gRPC API, and over what.
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    pub api_keys: Vec<SecretString>,
    pub api_keys_file: Option<PathBuf>,
    pub allow_unauthenticated: bool,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub upstream: UpstreamConfig,
    pub gateway: GatewaySettings,
    pub ledger: LedgerSettings,
    pub notify_addr: SocketAddr,
    pub notify: NotifySettings,
    /// Where notifications are stored, e.g. `sqlite://data/notifications.db`.
    pub store_url: String,
    pub admin_addr: SocketAddr,
    pub access: AccessConfig,
    /// Which web pages may call the gRPC port, and which host names it
    /// answers without keys.
    pub origins: OriginPolicy,
    pub shutdown_grace: Duration,
    pub max_connection_age: Option<Duration>,
    pub grpc_max_streams: u32,
    pub grpc_connections: ConnectionPolicy,
    pub grpc_call_timeout: Duration,
    pub grpc_max_message_bytes: usize,
    pub max_subscriptions: usize,
    pub max_subscriptions_per_connection: usize,
    pub retention: RetentionPolicy,
    /// Run this simulator in-process, on this address, and use it as the
    /// upstream.
    pub sandbox: Option<(SocketAddr, SandboxConfig)>,
}

impl ServeArgs {
    /// The checked configuration, or what is wrong with it (naming the
    /// variable). `serve` and `check` both start here.
    ///
    /// Every secret and placeholder problem is named at once, one per line,
    /// so that the example file's placeholders take one run, not one each.
    pub fn config(&self) -> Result<Config, String> {
        let mut problems = Vec::new();
        if !self.sandbox {
            problems.extend(self.kongtie.secret_problems(self.allow_document_token));
        }
        problems.extend(self.kongtie.placeholder_problems());
        // One line for the variable, however many of its keys are left.
        problems.extend(
            self.api_keys
                .iter()
                .find_map(|key| refuse_placeholder("KONGTIE_API_KEYS", key).err()),
        );
        if let Some(app_id) = &self.wechat_app_id {
            problems.extend(refuse_placeholder("KONGTIE_WECHAT_APP_ID", app_id).err());
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        let sandbox = self.sandbox.then(|| {
            let app_id = self
                .wechat_app_id
                .clone()
                .unwrap_or_else(|| SANDBOX_WECHAT_APP_ID.to_owned());
            (
                self.sandbox_addr,
                sandbox_config(&self.kongtie, app_id, Duration::from_secs(7200)),
            )
        });
        let wechat_app_id = self
            .wechat_app_id
            .clone()
            .or_else(|| sandbox.as_ref().map(|(_, s)| s.wechat_app_id.clone()));
        Ok(Config {
            grpc_addr: self.grpc_addr,
            upstream: UpstreamConfig {
                ktapi_url: self.ktapi_url.clone(),
                pay_url: self.pay_url.clone(),
                ktapi: self.kongtie.ktapi(),
                pay: self.kongtie.pay(),
                pay_fixed: self.kongtie.pay_fixed(),
                connect_timeout: Duration::from_millis(self.connect_timeout_ms),
                timeout: Duration::from_millis(self.upstream_timeout_ms),
            },
            gateway: GatewaySettings {
                wechat_app_id,
                token_ttl: Duration::from_secs(self.cache_ttl_secs),
                max_amount_fen: self.max_amount_fen,
                order_window: Duration::from_secs(self.order_ttl_secs),
                max_order_expiry: Duration::from_secs(self.order_max_expiry_secs),
            },
            ledger: LedgerSettings {
                prepay_ttl: Duration::from_secs(self.prepay_ttl_secs),
                max_runs: self.max_orders_in_flight,
                // Longer than any attempt: the upstream timeout bounds it,
                // with up to three connects (ParTrade is retried only when
                // it could not connect) and room for the ledger's writes.
                claim_lease: Duration::from_millis(
                    self.upstream_timeout_ms + 3 * self.connect_timeout_ms,
                ) + Duration::from_secs(2),
            },
            notify_addr: self.notify_addr,
            notify: NotifySettings {
                path: self.notify_path.clone(),
                token: self.kongtie.notify_token(),
                max_body_bytes: usize::try_from(self.notify_max_body_bytes).unwrap_or(usize::MAX),
                read_timeout: Duration::from_millis(self.notify_read_timeout_ms),
                max_connections: usize::try_from(self.notify_max_connections).unwrap_or(usize::MAX),
                request_timeout: Duration::from_millis(self.notify_timeout_ms),
                max_concurrency: usize::try_from(self.notify_max_concurrency).unwrap_or(usize::MAX),
                allow: self.notify_allow.clone(),
                trusted_proxies: self.trusted_proxies.clone(),
                max_age: self.notify_max_age_secs.map(Duration::from_secs),
            },
            admin_addr: self.admin_addr,
            access: AccessConfig {
                api_keys: self
                    .api_keys
                    .iter()
                    .map(|k| SecretString::from(k.as_str()))
                    .collect(),
                api_keys_file: self.api_keys_file.clone(),
                allow_unauthenticated: self.allow_unauthenticated,
                tls: self
                    .tls_cert
                    .clone()
                    .zip(self.tls_key.clone())
                    .map(|(cert, key)| TlsFiles {
                        cert,
                        key,
                        client_ca: self.tls_client_ca.clone(),
                    }),
            },
            origins: OriginPolicy {
                origins: self.allowed_origins.clone(),
                hosts: self.allowed_hosts.clone(),
            },
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            max_connection_age: (self.max_connection_age_secs > 0)
                .then(|| Duration::from_secs(self.max_connection_age_secs)),
            grpc_max_streams: self.grpc_max_streams,
            grpc_connections: ConnectionPolicy {
                max_connections: self.grpc_max_connections as usize,
                handshake_timeout: Duration::from_millis(self.grpc_handshake_timeout_ms),
                max_age: (self.max_connection_age_secs > 0)
                    .then(|| Duration::from_secs(self.max_connection_age_secs)),
                max_age_grace: Duration::from_secs(self.max_connection_age_grace_secs),
            },
            grpc_call_timeout: Duration::from_millis(self.grpc_call_timeout_ms),
            grpc_max_message_bytes: self.grpc_max_message_bytes as usize,
            max_subscriptions: self.max_subscriptions as usize,
            max_subscriptions_per_connection: self.max_subscriptions_per_connection as usize,
            store_url: self.store.url(),
            retention: {
                let keep = crate::retention::parse_duration(&self.retention)?;
                crate::retention::check_floor(
                    "KONGTIE_RETENTION",
                    keep,
                    self.unsafe_test_only_short_retention,
                )?;
                RetentionPolicy {
                    keep,
                    hard: match &self.retention_max {
                        Some(max) => crate::retention::parse_duration(max)?,
                        None => keep.map(|keep| keep * 2),
                    },
                    sweep_every: self.retention_sweep_every,
                }
            },
            sandbox,
        })
    }
}

/// The prefix of every placeholder in `deploy/kongtie-gateway.env.example`.
const PLACEHOLDER_PREFIX: &str = "change-me";

/// Refuses a value left as the example file's placeholder.
pub fn refuse_placeholder(var: &str, value: &str) -> Result<(), String> {
    if value
        .trim()
        .to_ascii_lowercase()
        .starts_with(PLACEHOLDER_PREFIX)
    {
        return Err(format!(
            "{var} still holds the example file's placeholder ({PLACEHOLDER_PREFIX}...): \
             set the real value"
        ));
    }
    Ok(())
}

fn secret(s: &str) -> Result<SecretString, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(SecretString::from(s))
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.to_owned())
}

fn url_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s.contains(['?', '#', ' ']) {
        return Err("must be a path starting with '/' (no query, fragment or space)".into());
    }
    Ok(s.to_owned())
}

/// An `http://` URL with a host. Kongtie's hosts speak plain HTTP, and the
/// HTTP client is built without TLS (its root-store loading would cost
/// every start and every test); an `https://` URL is refused here rather
/// than failing on the first call.
fn http_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("not an absolute URL: {e}"))?;
    if url.scheme() == "https" {
        return Err("https is not supported for Kongtie URLs (its hosts are http://)".into());
    }
    if url.scheme() != "http" || url.host_str().is_none() {
        return Err("must be an http:// URL with a host".into());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_values_are_refused_at_start_up_naming_the_flag() {
        for (args, names) in [
            (
                ["kongtie-gateway", "serve", "--ktapi-url", "ftp://x/"],
                "--ktapi-url",
            ),
            (
                ["kongtie-gateway", "serve", "--grpc-addr", "nowhere"],
                "--grpc-addr",
            ),
            (
                ["kongtie-gateway", "serve", "--cache-ttl-secs", "0"],
                "--cache-ttl-secs",
            ),
            (
                ["kongtie-gateway", "serve", "--source-from", ""],
                "--source-from",
            ),
            (
                ["kongtie-gateway", "serve", "--notify-path", "no-slash"],
                "--notify-path",
            ),
            (
                [
                    "kongtie-gateway",
                    "serve",
                    "--pay-url",
                    "https://zs5.jsjinfo.cn/v5/ParTrade.ashx",
                ],
                "https is not supported",
            ),
            (
                ["kongtie-gateway", "serve", "--notify-allow", "10.0.0.0/33"],
                "--notify-allow",
            ),
            (
                ["kongtie-gateway", "serve", "--tls-cert", "cert.pem"],
                "--tls-key",
            ),
        ] {
            let err = Cli::try_parse_naming_sources(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"))
                .to_string();
            assert!(err.contains(names), "{args:?}: {err}");
        }
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let all = ["kongtie-gateway", "serve"].iter().chain(args).copied();
        match Cli::try_parse_from(all).unwrap().command {
            Command::Serve(args) => *args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn secrets_are_checked_outside_the_sandbox_and_placeholders_everywhere() {
        let err = |args: &[&str]| serve(args).config().err().unwrap_or_default();
        assert!(err(&[]).starts_with("KONGTIE_TOKEN is not set"));
        assert!(
            err(&["--token", DOCUMENT_TOKEN]).starts_with("KONGTIE_TOKEN is the token printed")
        );
        assert!(
            serve(&["--token", DOCUMENT_TOKEN, "--allow-document-token"])
                .config()
                .is_ok()
        );
        assert!(serve(&["--sandbox"]).config().is_ok());
        assert!(
            err(&["--sandbox", "--pay-token", "change-me-x"])
                .starts_with("KONGTIE_PAY_TOKEN still holds the example file's placeholder")
        );
        // The notify token follows KONGTIE_TOKEN, not the pay token.
        let args = serve(&["--token", "t1", "--pay-token", "t2"]);
        assert_eq!(args.kongtie.notify_token().expose_secret(), "t1");
        assert_eq!(args.kongtie.pay().token.expose_secret(), "t2");
    }
}
