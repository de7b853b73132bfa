//! The `runcast` binary: parses arguments and hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = runcast_cli::Cli::parse();
    runcast_cli::init_logging(&cli.log);
    match runcast_cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("runcast: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
