//! `video-orchestrator`: see `video-orchestrator --help`.

use std::process::ExitCode;

use clap::Parser;
use video_orchestrator::cli::{run, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // The whole cause chain, no backtrace: the first line says what failed and how to fix it.
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
