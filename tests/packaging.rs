//! Packaging for a systemd host: the daemon speaks sd_notify, and the unit
//! file passes `systemd-analyze verify`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;

#[test]
fn daemon_notifies_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut server = Server::start_with_env(&[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY=1 within 10 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    // READY comes once the listener is up: a client can connect right away.
    std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("listening when READY");
    server.signal(15);
    let n = sock.recv(&mut buf).expect("STOPPING=1 at shutdown");
    assert!(String::from_utf8_lossy(&buf[..n])
        .lines()
        .any(|l| l == "STOPPING=1"));
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn unit_file_has_the_required_settings() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/sluice.service"))
        .unwrap();
    for line in [
        "Type=notify",
        "DynamicUser=yes",
        "StateDirectory=sluice",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l.trim() == line), "missing {line}");
    }
    assert!(
        unit.contains("--data-dir ${STATE_DIRECTORY}")
            || unit.contains("SLUICE_DATA_DIR=%S/sluice")
    );
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed here; .ci/run installs it so CI always checks");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/sluice.service"))
        .unwrap()
        .replace("/usr/local/bin/sluice", BIN);
    let path = dir.path().join("sluice.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Only complaints about this unit count (the host's own units may be odd).
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("sluice")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn make_install_honours_prefix_and_destdir() {
    let dest = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("install-files")
        .arg(format!("BIN={BIN}"))
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg("PREFIX=/usr")
        .output()
        .expect("make");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = dest.path().join("usr/bin/sluice");
    assert!(bin.exists());
    let v = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("sluice "));
    let unit =
        std::fs::read_to_string(dest.path().join("etc/systemd/system/sluice.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/sluice serve"), "{unit}");
}
