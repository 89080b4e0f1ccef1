//! The `energy-stream` binary: parse flags, start logging, hand over to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = energy_stream::config::parse_cli(std::env::args_os().collect(), |var| {
        std::env::var_os(var).is_some()
    })
    .unwrap_or_else(|e| e.exit());
    let json = cli.log_json;
    energy_stream::telemetry::init_logging(json);
    match energy_stream::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, no backtrace: every error is written for the operator.
            // Causes that the message already quotes are not repeated.
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !line.contains(&cause) {
                    line.push_str(": ");
                    line.push_str(&cause);
                }
            }
            energy_stream::telemetry::report_exit_error(json, &line);
            ExitCode::FAILURE
        }
    }
}
