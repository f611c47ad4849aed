//! The `sluice` binary: parses the command line and runs the daemon.

use std::process::ExitCode;

use sluice::config::{self, Command, USAGE};

fn init_logging(level: Option<&str>) {
    let mut builder = match level {
        Some(l) => {
            let mut b = env_logger::Builder::new();
            b.parse_filters(l);
            b
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    builder.format_timestamp_millis().init();
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if let Some(cmd) = args.peek().and_then(|a| a.to_str()).map(str::to_string) {
        if sluice::cli::data_dir::COMMANDS.contains(&cmd.as_str()) {
            args.next();
            let code = sluice::cli::data_dir::run(&cmd, args.collect());
            return ExitCode::from(code as u8);
        }
        if sluice::cli::COMMANDS.contains(&cmd.as_str()) {
            args.next();
            let code = sluice::cli::run(&cmd, args.collect());
            return ExitCode::from(code as u8);
        }
    }
    let parsed = config::parse(std::env::args_os().skip(1), |k| std::env::var(k).ok());
    match parsed {
        Err(e) => {
            eprintln!("sluice: {e}");
            eprintln!("Try 'sluice --help'.");
            ExitCode::from(2)
        }
        Ok(Command::Help) => {
            print!("{USAGE}");
            print!("\n{}", sluice::cli::USAGE);
            print!("\n{}", sluice::cli::data_dir::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("sluice {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Serve(cfg)) => {
            let telemetry = match sluice::telemetry::TelemetryConfig::resolve(
                cfg.otel_endpoint.clone(),
                cfg.otel_interval,
                |k| std::env::var(k).ok(),
            ) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(cfg.log_level.as_deref());
            match sluice::server::run(&cfg, &telemetry) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
