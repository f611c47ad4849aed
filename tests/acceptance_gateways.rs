//! The check a user would run (issue 12): start the three-node NATS cluster
//! and the two gateways with the README's own commands (section "Outgrowing
//! one machine"), then a stock Python gRPC client
//! (`tests/acceptance/two_gateways.py`, grpcio) publishes through one
//! gateway and consumes through the other.
//!
//! The commands use the README's fixed ports (4222-4224, 6222-6224, 50051,
//! 50052) and run in a temp dir holding a copy of `dist/`. The Python
//! environment is `target/pyenv` (made by `make deps`), or `SLUICE_PYTHON`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod nats_harness;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// The README's commands that start the cluster and the gateways.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = readme
        .split("## Outgrowing one machine")
        .nth(1)
        .expect("README has a section \"Outgrowing one machine\"");
    let block = section
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the section opens with a sh block");
    let commands: Vec<String> = block
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("for n in") || l.starts_with("sluice serve"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        commands
            .iter()
            .filter(|c| c.starts_with("sluice serve"))
            .count(),
        2,
        "the README block starts two gateways: {commands:?}"
    );
    commands
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python");
    assert!(
        p.exists(),
        "missing the Python environment for the acceptance check: run `make deps` \
         (it makes target/pyenv with grpcio and grpcio-tools) or set SLUICE_PYTHON"
    );
    p
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Processes started by the README's commands; their process groups are
/// killed on drop.
struct Started(Vec<Child>);

impl Drop for Started {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let pid = c.id() as libc::pid_t;
            // Only a group the child leads (never this test's own group).
            // SAFETY: getpgid and killpg take plain integers.
            unsafe {
                if pid > 0 && libc::getpgid(pid) == pid {
                    libc::killpg(pid, libc::SIGKILL);
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_port(port: u16, limit: Duration) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < limit,
            "nothing listens on {port} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_readme_cluster_and_two_gateways_pass_a_python_client_check() {
    let python = python();
    for port in [4222, 4223, 4224, 6222, 6223, 6224, 50051, 50052] {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} is taken: the README's commands need it free"
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("sluice-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&root.join("dist"), &dir.join("dist"));
    // `sluice` and `nats-server` as a user has them: on PATH.
    let nats = nats_harness::nats_server_binary();
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::os::unix::fs::symlink(SLUICE, bin_dir.join("sluice")).unwrap();
    std::os::unix::fs::symlink(&nats, bin_dir.join("nats-server")).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut started = Started(Vec::new());
    for cmd in readme_commands() {
        // `… &` lines run in the background: here each in its own process
        // group, so the test can stop everything they started.
        let script = format!("{} \nwait", cmd.trim_end_matches('&').trim());
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new("sh")
                .arg("-c")
                .arg(&script)
                .current_dir(&dir)
                .env("PATH", &path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            0,
        )
        .spawn()
        .expect("run a README command");
        started.0.push(child);
        if cmd.starts_with("for n in") {
            for port in [4222, 4223, 4224] {
                wait_port(port, Duration::from_secs(10));
            }
        }
    }
    wait_port(50051, Duration::from_secs(60));
    wait_port(50052, Duration::from_secs(60));

    let out = Command::new(&python)
        .arg(root.join("tests/acceptance/two_gateways.py"))
        .arg(root.join("proto"))
        .arg("127.0.0.1:50051")
        .arg("127.0.0.1:50052")
        .output()
        .expect("run the Python check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    drop(started);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "the Python check failed");
    assert!(stdout.contains("all checks passed"));
}
