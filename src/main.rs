use std::process::ExitCode;

use kongtie_gateway::{
    check,
    config::{Cli, Command},
    sandbox::SandboxHandle,
    startup::{Application, shutdown_signal},
    telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_naming_sources();
    // Kept to the end of main: the last lines, the error below among them,
    // are written out when it drops.
    let _telemetry;
    let result = match cli.command {
        Command::Serve(args) => {
            _telemetry = telemetry::init(args.log_format);
            match args.config() {
                Ok(config) => match Application::build(config).await {
                    Ok(app) => app.run_until(shutdown_signal()).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.into()),
            }
        }
        Command::Check(args) => {
            return if check::run(&args).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Backup(args) => {
            return match kongtie_gateway::backup::backup(&args.store.url(), &args.path).await {
                Ok(copied) => {
                    println!(
                        "backed up {} notifications (last sequence {}) to {} ({} bytes)",
                        copied.notifications,
                        copied.last_sequence,
                        args.path.display(),
                        copied.bytes
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kongtie-gateway backup: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Sandbox(args) => {
            _telemetry = telemetry::init(args.log_format);
            run_sandbox(*args).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            // A refused configuration names each of its problems on a line.
            for line in e.to_string().lines() {
                eprintln!("kongtie-gateway: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run_sandbox(
    args: kongtie_gateway::config::SandboxArgs,
) -> Result<(), kongtie_gateway::startup::BoxError> {
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("binding the sandbox on {}: {e}", args.addr))?;
    let sandbox = SandboxHandle::spawn(args.sandbox_config(), listener)?;
    tracing::info!(
        ktapi_url = %sandbox.ktapi_url(),
        pay_url = %sandbox.pay_url(),
        notify_url = %args.notify_url,
        "point a gateway here with --ktapi-url and --pay-url; payments are notified to notify_url"
    );
    shutdown_signal().await;
    sandbox.shutdown().await;
    Ok(())
}
