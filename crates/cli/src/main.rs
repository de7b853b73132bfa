//! The `runcast` binary: parses arguments and hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = runcast_cli::Cli::parse();
    let telemetry = match runcast_cli::init_telemetry(&cli) {
        Ok(t) => t,
        Err(e) => {
            runcast_cli::say!("runcast: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match runcast_cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            runcast_cli::say!("runcast: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
