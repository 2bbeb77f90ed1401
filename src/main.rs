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
            // The cause chain on one line, no backtrace: the first part says what failed and how
            // to fix it. Some errors (lapin's) repeat their source in their own text: a cause
            // already said is not said again.
            let mut line = String::new();
            for cause in e.chain().map(ToString::to_string) {
                if !line.contains(&cause) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&cause);
                }
            }
            eprintln!("error: {line}");
            ExitCode::from(1)
        }
    }
}
