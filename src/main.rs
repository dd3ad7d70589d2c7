//! The `cycleqd-engine` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line, the whole context chain: "generate: tiny/config.json: missing key `x`".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
