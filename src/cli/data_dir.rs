//! The data-dir commands of the `sluice` binary, which work on the files
//! rather than through a running broker: `check` (exit 1 on damage) and
//! `backup` (a consistent copy while the daemon runs). Usage errors exit 2.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::storage::sqlite::maintenance;

pub const COMMANDS: &[&str] = &["check", "backup"];

pub const USAGE: &str = "\
Data-dir commands (work on the files; safe while the daemon runs):
    sluice check [--data-dir DIR]
        SQLite's integrity check plus Sluice's invariants; exits 1 on damage
    sluice backup [--data-dir DIR] --to FILE
        a consistent copy of the database; restore by copying FILE to
        sluice.db in an empty data dir
    --data-dir defaults to $SLUICE_DATA_DIR, else ./sluice-data.
";

struct Args {
    data_dir: PathBuf,
    to: Option<PathBuf>,
}

fn parse(args: Vec<OsString>) -> Result<Args, String> {
    use lexopt::prelude::*;
    let mut out = Args {
        data_dir: std::env::var_os("SLUICE_DATA_DIR")
            .map_or_else(|| PathBuf::from("./sluice-data"), PathBuf::from),
        to: None,
    };
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("data-dir") => out.data_dir = p.value().map_err(|e| e.to_string())?.into(),
            Long("to") => out.to = Some(p.value().map_err(|e| e.to_string())?.into()),
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(out)
}

/// Runs `check` or `backup`; returns the exit code.
pub fn run(command: &str, args: Vec<OsString>) -> i32 {
    let args = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sluice {command}: {e}");
            eprintln!("Try 'sluice --help'.");
            return 2;
        }
    };
    match command {
        "check" => match maintenance::check(&args.data_dir) {
            Ok(r) => {
                println!(
                    "{}: {} topics, {} messages, {} consumer groups, last sequence {}",
                    args.data_dir.display(),
                    r.topics,
                    r.messages,
                    r.groups,
                    r.last_sequence
                );
                if r.problems.is_empty() {
                    println!("ok");
                    0
                } else {
                    for p in &r.problems {
                        println!("damaged: {p}");
                    }
                    1
                }
            }
            Err(e) => {
                eprintln!("sluice check: {e}");
                1
            }
        },
        "backup" => {
            let Some(to) = args.to else {
                eprintln!("sluice backup: --to FILE is required");
                return 2;
            };
            match maintenance::backup(&args.data_dir, &to) {
                Ok(r) => {
                    println!(
                        "backed up {} pages ({} bytes) to {} in {:?}",
                        r.pages,
                        r.bytes,
                        to.display(),
                        r.took
                    );
                    0
                }
                Err(e) => {
                    eprintln!("sluice backup: {e}");
                    1
                }
            }
        }
        other => {
            eprintln!("sluice: unknown command {other:?}");
            2
        }
    }
}
