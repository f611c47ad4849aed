//! The data-dir commands of the `sluice` binary, which work on the files
//! rather than through a running broker: `check` (exit 1 on damage),
//! `backup` (a consistent copy while the daemon runs) and `migrate` (a copy
//! into a JetStream cluster, with the daemon stopped). Usage errors exit 2.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::{self, StoreConfig};
use crate::storage::jetstream::migrate::{self, MigrateConfig};
use crate::storage::jetstream::JetStreamStoreConfig;
use crate::storage::sqlite::maintenance;

pub const COMMANDS: &[&str] = &["check", "backup", "migrate"];

pub const USAGE: &str = "\
Data-dir commands (work on the files; safe while the daemon runs):
    sluice check [--data-dir DIR]
        SQLite's integrity check plus Sluice's invariants; exits 1 on damage
    sluice backup [--data-dir DIR] --to FILE
        a consistent copy of the database; restore by copying FILE to
        sluice.db in an empty data dir
    sluice migrate [--data-dir DIR] --to nats://HOST:PORT[,...] [--nats-token T]
                   [--nats-replicas N] [--nats-prefix P]
        copies the store into a JetStream cluster for `sluice serve --store nats://...`
        with the same --nats-replicas and --nats-prefix; the daemon must be stopped.
        Re-running it finishes an interrupted copy and never duplicates anything
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

/// Runs `check`, `backup` or `migrate`; returns the exit code.
pub fn run(command: &str, args: Vec<OsString>) -> i32 {
    if command == "migrate" {
        return run_migrate(args);
    }
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

/// `migrate`'s flags. The `--nats-*` flags and `--data-dir` are checked (and
/// default from their environment variables) exactly as `sluice serve`
/// does, so the copy matches the gateway that will serve it.
fn parse_migrate(args: Vec<OsString>) -> Result<MigrateConfig, String> {
    use lexopt::prelude::*;
    let mut to = None;
    let mut serve_args: Vec<OsString> = Vec::new();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("to") => {
                let v = p.value().map_err(|e| e.to_string())?;
                to = Some(
                    v.into_string()
                        .map_err(|_| "invalid value for --to: not UTF-8".to_string())?,
                );
            }
            Long(flag @ ("data-dir" | "nats-token" | "nats-replicas" | "nats-prefix")) => {
                let flag = format!("--{flag}");
                serve_args.push(flag.into());
                serve_args.push(p.value().map_err(|e| e.to_string())?);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    let to = to.ok_or("--to nats://HOST:PORT[,...] is required")?;
    let cluster = match config::parse_store(&to).map_err(|e| {
        e.replace("--store", "--to")
            .replace("expected sqlite or ", "expected ")
    })? {
        StoreConfig::JetStream(c) => c,
        StoreConfig::Sqlite => {
            return Err(format!(
            "invalid value {to:?} for --to: expected nats://[USER:PASS@]HOST:PORT[,HOST:PORT...]"
        ))
        }
    };
    const ENV: &[&str] = &[
        "SLUICE_DATA_DIR",
        "SLUICE_NATS_TOKEN",
        "SLUICE_NATS_REPLICAS",
        "SLUICE_NATS_PREFIX",
    ];
    let serve = match config::parse(serve_args, |k| {
        ENV.contains(&k).then(|| std::env::var(k).ok()).flatten()
    })? {
        config::Command::Serve(c) => c,
        _ => return Err("unexpected arguments".into()),
    };
    Ok(MigrateConfig {
        data_dir: serve.data_dir.clone(),
        store: JetStreamStoreConfig {
            cluster,
            token: serve.nats_token.clone(),
            replicas: serve.nats_replicas,
            prefix: serve.nats_prefix.clone(),
            lease: serve.nats_lease,
            writer_queue: serve.writer_queue,
            retention_max_age: None,
            retention_max_messages: None,
            retention_max_bytes: None,
            dedup_window: serve.dedup_window,
        },
    })
}

fn run_migrate(args: Vec<OsString>) -> i32 {
    let cfg = match parse_migrate(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice migrate: {e}");
            eprintln!("Try 'sluice --help'.");
            return 2;
        }
    };
    // What the JetStream store logs while preparing the stream (a changed
    // retention, say) is worth seeing here too.
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
    eprintln!(
        "sluice migrate: copying {} into {} (stream {}, {} replicas)",
        cfg.data_dir.display(),
        cfg.store.cluster,
        cfg.store.prefix.to_uppercase(),
        cfg.store.replicas
    );
    let mut report = |p: &migrate::Progress| {
        eprintln!(
            "sluice migrate: {} messages copied, {} fillers, at sequence {} of {} ({:.1}s)",
            p.copied,
            p.fillers,
            p.sequence,
            p.last_sequence,
            p.elapsed.as_secs_f64()
        );
    };
    match migrate::run(&cfg, &mut report) {
        Ok(s) => {
            println!(
                "migrated {} to {}: {} messages copied ({} were already there), {} fillers \
                 ({} purged), {} topics ({} newly registered), {} consumer group cursors \
                 ({} written), last sequence {}, in {:.1}s",
                cfg.data_dir.display(),
                cfg.store.cluster,
                s.copied,
                s.already_copied,
                s.fillers,
                s.fillers_purged,
                s.topics,
                s.topics_registered,
                s.cursors,
                s.cursors_written,
                s.last_sequence,
                s.elapsed.as_secs_f64()
            );
            0
        }
        Err(e) => {
            eprintln!("sluice migrate: {e}");
            1
        }
    }
}
