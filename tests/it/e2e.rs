//! The QEMU tier: build the real image once, boot it under SeaBIOS and under OVMF, and check the site over HTTP
//! through nginx; power it off with the ACPI button and boot the same disk again. It takes minutes, so its tests are
//! `#[ignore]`d and show as ignored in a plain `cargo test`; `just test` with `FOOBAR_E2E=1` (`just e2e`, and CI)
//! runs them with `--include-ignored`.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{self, binary, get_host, post_json_host, release_binary};

const SITE: &str = "www.foobar.com";
const READY_LIMIT: Duration = Duration::from_secs(300);

/// A guest started with `imagebuild boot`; killed when dropped.
struct Guest {
    child: Child,
    port: u16,
    serial: PathBuf,
    monitor: PathBuf,
}

impl Guest {
    fn boot(image: &Path, uefi: bool, write: bool) -> Guest {
        Self::boot_with(image, uefi, write, &[])
    }

    fn boot_with(image: &Path, uefi: bool, write: bool, forwards: &[(u16, u16)]) -> Guest {
        Self::boot_full(image, uefi, write, forwards, &[])
    }

    /// With extra `imagebuild boot` flags (`--platform`, `--metadata`, `--seed`).
    fn boot_full(image: &Path, uefi: bool, write: bool, forwards: &[(u16, u16)], extra: &[String]) -> Guest {
        let dir = support::temp_dir("guest");
        let port = support::free_port_block(3);
        let serial = dir.join("serial.log");
        let monitor = dir.join("monitor.sock");
        let mut cmd = Command::new(binary("imagebuild"));
        cmd.arg("boot")
            .arg(image)
            .args(["--port", &port.to_string(), "--serial"])
            .arg(&serial)
            .arg("--monitor")
            .arg(&monitor);
        if uefi {
            cmd.arg("--uefi");
        }
        if write {
            cmd.arg("--write");
        }
        for (host, guest) in forwards {
            cmd.args(["--forward", &format!("{host}:{guest}")]);
        }
        cmd.args(extra);
        let stderr = std::fs::File::create(dir.join("qemu.log")).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("imagebuild boot starts");
        Guest {
            child,
            port,
            serial,
            monitor,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn console_tail(&self) -> String {
        let qemu = std::fs::read_to_string(self.serial.with_file_name("qemu.log")).unwrap_or_default();
        let text = std::fs::read_to_string(&self.serial).unwrap_or_default() + "\n--- imagebuild boot:\n" + &qemu;
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Seconds from now until `/readyz` answers 200 through nginx. Each poll is a fresh request that gives up after
    /// 1 s: a connection made before the guest listens can hang in QEMU's user network, and would otherwise hold the
    /// measurement until its timeout (it showed as boots of exactly 30.8 s).
    fn wait_ready(&mut self) -> f64 {
        let start = Instant::now();
        let poll = ureq::AgentBuilder::new().timeout(Duration::from_secs(1)).build();
        loop {
            if let Ok(r) = poll.get(&self.url("/readyz")).set("Host", SITE).call() {
                if r.status() == 200 {
                    return start.elapsed().as_secs_f64();
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "QEMU exited ({status}) before the guest was ready; console:\n{}",
                    self.console_tail()
                );
            }
            assert!(
                start.elapsed() < READY_LIMIT,
                "guest not ready within {READY_LIMIT:?}; console:\n{}",
                self.console_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Presses the ACPI power button and returns how long the guest took to power off.
    fn power_button(&mut self) -> Duration {
        let mut monitor = UnixStream::connect(&self.monitor).expect("QEMU monitor socket");
        monitor.write_all(b"system_powerdown\n").unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "QEMU exit status {status}; console:\n{}",
                    self.console_tail()
                );
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "guest still running a minute after the power button; console:\n{}",
                self.console_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `imagebuild smoke` against a guest (JSON output): each check's status by name, and the whole document for messages.
fn smoke(guest: &Guest, extra: &[&str]) -> (std::collections::BTreeMap<String, String>, String) {
    let out = Command::new(binary("imagebuild"))
        .args([
            "smoke",
            &guest.url(""),
            "--host",
            SITE,
            "--insecure",
            "--format",
            "json",
        ])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|err| {
        panic!(
            "smoke printed no JSON ({err}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut statuses: std::collections::BTreeMap<String, String> = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        out.status.success(),
        doc["failed"] == 0,
        "the exit status follows the result: {text}"
    );
    // The URL is an address: the DNS check skips, by design (it is tested against dnsmasq in smoke.rs).
    assert_eq!(statuses.remove("dns").as_deref(), Some("skip"), "{text}");
    (statuses, text)
}

/// What every booted guest must serve: the whole smoke suite passes, plus what is particular to our image.
fn check_site(guest: &Guest) {
    let (statuses, text) = smoke(guest, &[]);
    assert!(statuses.len() >= 15 && statuses.values().all(|s| s == "pass"), "{text}");

    let (page, _) = get_host(&guest.url("/"), SITE).unwrap();
    assert!(page.body.contains("Welcome to foobar"), "{}", page.body);
    let (metrics, _) = get_host(&guest.url("/metrics"), SITE).unwrap();
    assert_eq!(metrics.status, 404, "/metrics is not served to outside clients");
}

/// Figures go straight to stderr, past the test harness's capture, so CI logs show them.
fn report(line: String) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed().as_secs_f64())
}

/// The image every QEMU test boots, built once per test run, with an SSH key for the admin user.
struct Built {
    image: PathBuf,
    raw: PathBuf,
    key: PathBuf,
    build_secs: f64,
}

/// One QEMU test at a time: two cores do not run several guests under TCG well.
pub(crate) static QEMU: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `imagebuild --out OUT --agent-bin <release agent> ARGS...`: its output and the seconds it took.
fn imagebuild_out<S: AsRef<std::ffi::OsStr>>(out: &Path, args: &[S]) -> (std::process::Output, f64) {
    imagebuild_from(&binary("imagebuild"), &release_binary("foobar-agent"), out, args)
}

/// `imagebuild_out` with another checkout's `imagebuild` and agent.
fn imagebuild_from<S: AsRef<std::ffi::OsStr>>(
    imagebuild: &Path,
    agent: &Path,
    out: &Path,
    args: &[S],
) -> (std::process::Output, f64) {
    timed(|| {
        Command::new(imagebuild)
            .arg("--out")
            .arg(out)
            .arg("--agent-bin")
            .arg(agent)
            .args(args)
            .output()
            .unwrap()
    })
}

/// Builds the image as qcow2 at `image` and raw beside it, with the SSH key `key`; returns the seconds it took and
/// imagebuild's log.
fn build(image: &Path, key: &Path) -> (f64, String) {
    build_with(image, key, &[])
}

/// `build` with extra `imagebuild` flags.
fn build_with(image: &Path, key: &Path, extra: &[&std::ffi::OsStr]) -> (f64, String) {
    build_from(
        &binary("imagebuild"),
        &release_binary("foobar-agent"),
        image,
        key,
        extra,
    )
}

/// `build_with` another checkout's `imagebuild` (and the initramfs programs beside it) and agent.
fn build_from(imagebuild: &Path, agent: &Path, image: &Path, key: &Path, extra: &[&std::ffi::OsStr]) -> (f64, String) {
    let pubkey = key.with_extension("pub");
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--format".as_ref(),
        "qcow2".as_ref(),
        "--format".as_ref(),
        "raw".as_ref(),
        "--ssh-key".as_ref(),
        pubkey.as_os_str(),
    ];
    args.extend_from_slice(extra);
    let (out, secs) = imagebuild_from(imagebuild, agent, image, &args);
    assert!(
        out.status.success(),
        "imagebuild failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (secs, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn built() -> &'static Built {
    static BUILT: std::sync::OnceLock<Built> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = support::temp_dir("e2e");
        let key = dir.join("id_ed25519");
        let keygen = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f"])
            .arg(&key)
            .status();
        assert!(keygen.unwrap().success(), "ssh-keygen (openssh-client) runs");
        let image = dir.join("foobar.qcow2");
        let (build_secs, _) = build(&image, &key);
        Built {
            raw: dir.join("foobar.raw"),
            image,
            key,
            build_secs,
        }
    })
}

/// Runs a command in the guest over SSH as `user` with the test key: (exit code, stdout, stderr). sshd and logins
/// open just after nginx starts, so a connection refused or reset in the first seconds after readiness is retried.
fn ssh(guest: &Guest, key: &Path, user: &str, extra: &[&str], command: &str) -> (i32, String, String) {
    let start = Instant::now();
    loop {
        let (code, out, err) = ssh_once(guest, key, user, extra, command);
        let not_yet = code == 255
            && [
                "Connection reset",
                "Connection refused",
                "kex_exchange_identification",
                "not permitted to log in yet",
            ]
            .iter()
            .any(|s| err.contains(s));
        if !not_yet || start.elapsed() > Duration::from_secs(30) {
            return (code, out, err);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn ssh_once(guest: &Guest, key: &Path, user: &str, extra: &[&str], command: &str) -> (i32, String, String) {
    let out = Command::new("ssh")
        .args(["-p", &(guest.port + 2).to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
        ])
        .args(["-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR"])
        .args(extra)
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn the_image_boots_under_bios_and_uefi_serves_the_site_and_keeps_data_across_power_off() {
    let _qemu = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let Built {
        image, raw, build_secs, ..
    } = built();
    let (image, raw, build_secs) = (image.clone(), raw.clone(), *build_secs);
    let dir = support::temp_dir("e2e-disk");

    // The outputs, checked by independent readers.
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let sums = std::fs::read_to_string(format!("{}.sha256", image.display())).unwrap();
    let actual = Command::new("sha256sum").arg(&image).output().unwrap();
    let actual = String::from_utf8_lossy(&actual.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(
        sums.contains(&format!("{actual}  foobar.qcow2")),
        "sha256 file {sums} vs {actual}"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}.manifest.json", image.display())).unwrap()).unwrap();
    assert!(manifest["packages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "mariadb-server"));
    assert!(manifest["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["sha256"] == actual.as_str()));
    let table = Command::new("sfdisk").arg("--json").arg(&raw).output().unwrap();
    let table: serde_json::Value = serde_json::from_slice(&table.stdout).expect("sfdisk reads the GPT");
    let types: Vec<&str> = table["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "21686148-6449-6E6F-744E-656564454649",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
        ]
    );
    let verify = Command::new("sfdisk").arg("--verify").arg(&raw).output().unwrap();
    assert!(
        verify.status.success(),
        "sfdisk --verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let size_mb = std::fs::metadata(&image).unwrap().len() as f64 / 1e6;

    // SeaBIOS, writing to a copy of the disk so that a second boot sees what the first one stored.
    let disk = dir.join("disk.qcow2");
    std::fs::copy(&image, &disk).unwrap();
    let mut bios = Guest::boot(&disk, false, true);
    let bios_ready = bios.wait_ready();
    check_site(&bios);
    let marker = format!("e2e post {}", std::process::id());
    let created = post_json_host(&bios.url("/api/posts"), SITE, &json!({"author": "e2e", "body": marker})).unwrap();
    assert_eq!(created.status, 201, "{}", created.body);
    let (list, _) = get_host(&bios.url("/api/posts"), SITE).unwrap();
    assert_eq!(list.json()[0]["body"], marker.as_str());
    let (page, _) = get_host(&bios.url("/posts"), SITE).unwrap();
    assert!(page.body.contains(&marker));
    let health = detailed_health(&bios);
    assert_eq!(
        health["checks"]["migrations:version"][0]["appliedThisStart"], 1,
        "{health}"
    );
    let powerdown = bios.power_button();
    drop(bios);

    let mut again = Guest::boot(&disk, false, true);
    let second_ready = again.wait_ready();
    let (list, _) = get_host(&again.url("/api/posts"), SITE).unwrap();
    assert_eq!(
        list.json()[0]["body"],
        marker.as_str(),
        "the post survived the power-off"
    );
    let health = detailed_health(&again);
    let check = &health["checks"]["migrations:version"][0];
    assert_eq!(check["appliedThisStart"], 0, "no migration ran twice: {check}");
    assert_eq!(check["observedValue"], 1);

    // The daily backup, run now by its unit, brings the post back after it is lost.
    let key = &built().key;
    let run = |command: &str| {
        let (code, out, err) = ssh(&again, key, "admin", &[], command);
        assert_eq!(code, 0, "{command}: {out}{err}");
        out.trim().to_string()
    };
    assert_eq!(run("systemctl is-enabled foobar-backup.timer"), "enabled");
    run("sudo systemctl start foobar-backup.service");
    let backup = run("sudo sh -c 'ls /var/backups/foobar/foobar-foobar-*.sql.gz'");
    assert!(
        backup.ends_with(".sql.gz") && !backup.contains('\n'),
        "one backup: {backup}"
    );
    run("sudo mariadb foobar -e 'DELETE FROM posts'");
    // A read answer is kept for up to read-cache-ms (1 s).
    std::thread::sleep(Duration::from_secs(2));
    let (list, _) = get_host(&again.url("/api/posts"), SITE).unwrap();
    assert!(!list.body.contains(&marker), "the post is gone: {}", list.body);
    run(&format!("sudo -u foobar /usr/local/bin/foobar-agent restore {backup}"));
    std::thread::sleep(Duration::from_secs(2));
    let (list, _) = get_host(&again.url("/api/posts"), SITE).unwrap();
    assert_eq!(
        list.json()[0]["body"],
        marker.as_str(),
        "the post is back from the backup"
    );
    drop(again);

    // OVMF, from the pristine image.
    let mut uefi = Guest::boot(&image, true, false);
    let uefi_ready = uefi.wait_ready();
    check_site(&uefi);
    let created = post_json_host(
        &uefi.url("/api/posts"),
        SITE,
        &json!({"author": "uefi", "body": "hello"}),
    )
    .unwrap();
    assert_eq!(created.status, 201);
    drop(uefi);

    report(format!(
        "e2e figures: build {build_secs:.0} s, qcow2 {size_mb:.0} MB, boot-to-ready (TCG) SeaBIOS {bios_ready:.1} s, \
         OVMF {uefi_ready:.1} s, second boot {second_ready:.1} s, power-off {:.1} s",
        powerdown.as_secs_f64()
    ));
}

/// The SHA-256 fingerprint of the certificate served on the guest's HTTPS port, and its subject alternative names.
fn tls_certificate(guest: &Guest) -> (String, String) {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{} -servername {SITE} </dev/null 2>/dev/null \
         | openssl x509 -noout -fingerprint -sha256 -ext subjectAltName",
        guest.port + 1
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fingerprint = text
        .lines()
        .find(|l| l.contains("Fingerprint"))
        .unwrap_or_else(|| panic!("no certificate: {text}"));
    (fingerprint.split('=').nth(1).unwrap().to_string(), text)
}

fn ssh_host_key(guest: &Guest) -> String {
    let out = Command::new("ssh-keyscan")
        .args(["-p", &(guest.port + 2).to_string(), "-t", "ed25519", "127.0.0.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no host key from ssh-keyscan: {text}"))
        .to_string()
}

/// True when `needle` occurs anywhere in the file (read in chunks; the raw image is sparse and large).
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let out = Command::new("grep")
        .args(["-c", "-a", "-F"])
        .arg(String::from_utf8_lossy(needle).as_ref())
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() != "0"
}

/// A forwarded port that nothing may answer on: after connecting and sending a request, no byte comes back.
fn assert_silent(port: u16, what: &str) {
    use std::io::Read as _;
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) if n > 0 => panic!("guest port {what} answered: {:?}", String::from_utf8_lossy(&buf[..n])),
        _ => {}
    }
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn each_instance_has_its_own_identity_and_only_ssh_http_https_answer() {
    let _qemu = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let built = built();
    // Guest ports that must stay closed, forwarded from free host ports (first guest only).
    let base = support::free_port_block(102);
    let closed: Vec<(u16, u16)> = std::iter::once(3306)
        .chain(8000..=8100)
        .enumerate()
        .map(|(i, guest)| (base + i as u16, guest))
        .collect();
    let mut a = Guest::boot_with(&built.image, false, false, &closed);
    let mut b = Guest::boot(&built.image, false, false);
    let a_ready = a.wait_ready();
    let b_ready = b.wait_ready();

    // Identity: machine id, SSH host key and TLS certificate differ between instances and are not in the image.
    let machine_a = ssh(&a, &built.key, "admin", &[], "cat /etc/machine-id");
    let machine_b = ssh(&b, &built.key, "admin", &[], "cat /etc/machine-id");
    assert_eq!(machine_a.0, 0, "ssh with the configured key works: {}", machine_a.2);
    assert_eq!(machine_a.1.len(), 32, "{machine_a:?}");
    assert_ne!(machine_a.1, machine_b.1, "machine ids differ");
    let (host_a, host_b) = (ssh_host_key(&a), ssh_host_key(&b));
    assert_ne!(host_a, host_b, "SSH host keys differ");
    let ((tls_a, sans), (tls_b, _)) = (tls_certificate(&a), tls_certificate(&b));
    assert_ne!(tls_a, tls_b, "TLS certificates differ");
    assert!(
        sans.contains("DNS:www.foobar.com") && sans.contains("DNS:foobar.com"),
        "{sans}"
    );
    for (what, needle) in [("machine id", machine_a.1.as_str()), ("SSH host key", host_a.as_str())] {
        assert!(
            !file_contains(&built.raw, needle.as_bytes()),
            "the image contains an instance's {what}"
        );
    }

    // Names: the DNS server DHCP names (QEMU's, 10.0.2.3) through systemd-resolved's stub, never the build host's
    // resolv.conf, which is nowhere in the image.
    let (code, dns, stderr) = ssh(
        &a,
        &built.key,
        "admin",
        &[],
        "readlink /etc/resolv.conf; grep '^nameserver' /etc/resolv.conf; resolvectl dns",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        dns.starts_with("../run/systemd/resolve/stub-resolv.conf\nnameserver 127.0.0.53") && dns.contains("10.0.2.3"),
        "{dns}"
    );
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    for line in host_resolv.lines().filter(|l| l.starts_with("nameserver")) {
        assert!(
            !file_contains(&built.raw, line.as_bytes()),
            "the image holds the build host's `{line}`"
        );
    }

    // SSH: key login with sudo; no password, no root.
    let (code, _, stderr) = ssh(&a, &built.key, "admin", &[], "sudo -n true");
    assert_eq!(code, 0, "sudo -n true: {stderr}");
    let (code, _, stderr) = ssh(
        &a,
        &built.key,
        "admin",
        &[
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
        ],
        "true",
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("Permission denied (publickey)"),
        "only public keys are offered: {stderr}"
    );
    let (code, _, stderr) = ssh(&a, &built.key, "root", &[], "true");
    assert_ne!(code, 0, "root login refused");
    assert!(stderr.contains("Permission denied"), "{stderr}");

    // Network surface: 80, 443 and 22 answer; MariaDB and 8000-8100 do not.
    assert_eq!(get_host(&a.url("/"), SITE).unwrap().0.status, 200);
    // All at once: each probe waits 3 s for an answer that must not come.
    std::thread::scope(|scope| {
        for (host, guest) in &closed {
            scope.spawn(move || assert_silent(*host, &guest.to_string()));
        }
    });
    let (_, failed, _) = ssh(
        &a,
        &built.key,
        "admin",
        &[],
        "systemctl list-units --failed --plain --no-legend",
    );
    assert_eq!(failed, "", "failed units in the guest");
    let (_, rules, _) = ssh(&a, &built.key, "admin", &[], "sudo nft list chain inet foobar input");
    assert!(
        rules.contains("policy drop") && rules.contains("tcp dport { 22, 80, 443 } accept"),
        "{rules}"
    );
    let (code, listening, _) = ssh(&a, &built.key, "admin", &[], "sudo ss -Htln");
    assert_eq!(code, 0);
    assert!(!listening.contains(":3306"), "MariaDB listens on TCP: {listening}");

    // The agent's sandbox, as systemd rates it.
    let (_, security, _) = ssh(
        &a,
        &built.key,
        "admin",
        &[],
        "sudo systemd-analyze security foobar-agent.service --no-pager | tail -1",
    );
    // No route to the cloud metadata address from the agent's unit (where the site's app runs too): a process in its
    // cgroup is refused at connect, before any packet leaves.
    let (_, refused, _) = ssh(
        &a,
        &built.key,
        "admin",
        &[],
        // A link-local address of the guest's own (sshd answers on it), so that nothing leaves the guest whatever
        // happens: from outside the agent's unit it connects; from inside, it must not.
        "sudo ip addr add 169.254.77.1/32 dev lo && \
         sudo timeout 5 bash -c 'exec 3<>/dev/tcp/169.254.77.1/22' && echo outside=connected; \
         sudo timeout 5 bash -c 'echo $$ > /sys/fs/cgroup/system.slice/foobar-agent.service/cgroup.procs && \
         exec 3<>/dev/tcp/169.254.77.1/22' 2>&1; echo inside=$?",
    );
    assert!(
        refused.contains("outside=connected") && !refused.contains("inside=0"),
        "a link-local address from the agent's unit: {refused}"
    );
    // The early power-button watch handed the button to logind once logind had it.
    let (_, handed, _) = ssh(
        &a,
        &built.key,
        "admin",
        &[],
        "sudo journalctl -u foobar-power-button --no-pager -o cat",
    );
    assert!(handed.contains("logind handles the power button now"), "{handed}");
    // Security updates: unattended-upgrades itself (a dry run, which fetches nothing) reads the security suite only,
    // and apt's daily timer that runs it is on.
    let (_, origins, _) = ssh(
        &a,
        &built.key,
        "admin",
        &[],
        "sudo unattended-upgrade --dry-run --debug 2>&1 | grep -i 'allowed origins'; systemctl is-enabled apt-daily-upgrade.timer",
    );
    assert!(
        origins.contains("codename=bookworm-security,label=Debian-Security")
            && !origins.contains("label=Debian,")
            && !origins.contains("label=Debian\n")
            && origins.contains("enabled"),
        "unattended-upgrades: {origins}"
    );

    // Killing the agent: systemd restarts it; requests meanwhile wait in the socket's queue instead of failing.
    let (code, _, stderr) = ssh(
        &a,
        &built.key,
        "admin",
        &[],
        "sudo systemctl kill --signal=KILL foobar-agent.service",
    );
    assert_eq!(code, 0, "{stderr}");
    let killed = Instant::now();
    let mut failures = Vec::new();
    let restart = loop {
        match get_host(&a.url("/api/posts"), SITE) {
            Ok((r, _)) if r.status == 200 => {}
            Ok((r, _)) => failures.push(format!("{} {}", r.status, r.body)),
            Err(e) => failures.push(e),
        }
        if let Ok((r, _)) = get_host(&a.url("/readyz"), SITE) {
            if r.status == 200 && killed.elapsed() > Duration::from_millis(1500) {
                break killed.elapsed();
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "agent not back: {}",
            a.console_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(restart < Duration::from_secs(5), "ready again after {restart:?}");
    assert!(
        failures.is_empty(),
        "requests failed while the agent restarted: {failures:?}"
    );
    let (_, restarts, _) = ssh(
        &a,
        &built.key,
        "admin",
        &[],
        "systemctl show -p NRestarts --value foobar-agent.service",
    );
    assert_eq!(restarts, "1", "systemd restarted the agent once");

    // With the agent stopped, smoke fails exactly the agent's checks, and nginx's own still pass.
    let (code, _, stderr) = ssh(
        &a,
        &built.key,
        "admin",
        &[],
        "sudo systemctl stop foobar-agent.socket foobar-agent.service",
    );
    assert_eq!(code, 0, "{stderr}");
    let (statuses, text) = smoke(&a, &[]);
    let failed: Vec<&str> = statuses
        .iter()
        .filter(|(_, s)| *s == "fail")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        failed,
        [
            "api-read",
            "api-write",
            "healthz",
            "livez",
            "page-read",
            "page-write",
            "readyz"
        ],
        "{text}"
    );
    for name in [
        "static-page",
        "static-asset",
        "redirect-to-canonical",
        "https",
        "security-headers",
    ] {
        assert_eq!(statuses[name], "pass", "{name}: {text}");
    }
    let (code, _, stderr) = ssh(&a, &built.key, "admin", &[], "sudo systemctl start foobar-agent.socket");
    assert_eq!(code, 0, "{stderr}");
    let (statuses, text) = smoke(&a, &["--wait", "30"]);
    assert!(statuses.values().all(|s| s == "pass"), "back after a start: {text}");

    // Limits: a burst of writes gets 429s and nothing else breaks; a 2 MiB body gets 413.
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..60 {
        let r = post_json_host(
            &a.url("/api/posts"),
            SITE,
            &json!({"author": "burst", "body": format!("burst {i}")}),
        )
        .unwrap();
        *statuses.entry(r.status).or_insert(0) += 1;
    }
    assert!(statuses.get(&429).is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(statuses.get(&201).is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(statuses.keys().all(|s| *s == 201 || *s == 429), "{statuses:?}");
    assert_eq!(get_host(&a.url("/"), SITE).unwrap().0.status, 200);
    let big = "x".repeat(2 * 1024 * 1024);
    let r = post_json_host(&a.url("/api/posts"), SITE, &json!({"author": "big", "body": big})).unwrap();
    assert_eq!(r.status, 413);
    let (posts, headers) = get_host(&a.url("/posts"), SITE).unwrap();
    assert_eq!(posts.status, 200);
    assert!(
        header(&headers, "content-security-policy").is_some_and(|v| v.contains("default-src 'self'")),
        "{headers:?}"
    );
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));

    report(format!(
        "e2e identity figures: two guests ready in {a_ready:.1} s and {b_ready:.1} s (booted together), agent back \
         {:.1} s after SIGKILL, systemd-analyze security: {security}",
        restart.as_secs_f64()
    ));
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn a_first_boot_cut_off_completes_on_the_next_boot_and_the_root_grows_to_the_disk() {
    let _qemu = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let built = built();
    let dir = support::temp_dir("e2e-grow");
    let disk = dir.join("disk.qcow2");
    std::fs::copy(&built.image, &disk).unwrap();
    let resize = Command::new("qemu-img")
        .args(["resize", "-f", "qcow2"])
        .arg(&disk)
        .arg("4G")
        .output()
        .unwrap();
    assert!(resize.status.success(), "{}", String::from_utf8_lossy(&resize.stderr));

    // Power is cut (QEMU killed) in the middle of first boot, after the disk grew but before the marker.
    let mut first = Guest::boot(&disk, false, true);
    let start = Instant::now();
    loop {
        let console = std::fs::read_to_string(&first.serial).unwrap_or_default();
        if console.contains("foobar-firstboot: SSH host keys") {
            break;
        }
        assert!(
            start.elapsed() < READY_LIMIT,
            "first boot never reached its SSH step:\n{}",
            first.console_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(first);

    let mut second = Guest::boot(&disk, false, true);
    let ready = second.wait_ready();
    check_site(&second);
    let (code, size, stderr) = ssh(&second, &built.key, "admin", &[], "df -B1 --output=size / | tail -1");
    assert_eq!(code, 0, "{stderr}");
    let size: u64 = size.trim().parse().unwrap();
    assert!(
        size > 3_500_000_000,
        "root file system fills the 4 GiB disk: {size} bytes"
    );
    let (_, marker, _) = ssh(
        &second,
        &built.key,
        "admin",
        &[],
        "test -e /var/lib/foobar/first-boot.done && echo done",
    );
    assert_eq!(marker, "done");
    report(format!(
        "e2e first-boot figures: ready {ready:.1} s after an interrupted first boot; root {size} bytes"
    ));
}

fn verify(image: &Path) -> (bool, String) {
    let (code, text) = support::imagebuild_verify(image);
    (code == Some(0), text)
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn two_builds_from_the_same_inputs_are_byte_identical_and_verify_catches_a_changed_byte() {
    let built = built();
    let _one_at_a_time = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let dir = support::temp_dir("rebuild");
    // A second checkout of the same source at another path, its imagebuild, initramfs programs and agent compiled
    // there: its target directories are seeded with this checkout's, so only the workspace's crates compile again
    // (the registry's paths are under CARGO_HOME, the same from both).
    let (second, compiled) = timed(|| {
        let checkout = dir.join("checkout-two");
        support::clone_checkout(&checkout);
        for profile in ["debug", "release"] {
            support::seed_target(&checkout.join("target"), profile);
        }
        support::cargo_in(&checkout, &["build", "-q", "--offline", "--locked", "--workspace"]);
        support::cargo_in(
            &checkout,
            &["build", "-q", "--offline", "--locked", "--release", "--workspace"],
        );
        checkout
    });
    // From scratch: a package layer of its own (an empty cache of its own, not read or written), so nothing is
    // shared with the first build but the inputs; from the second checkout, or this one.
    let cold = |name: &str, checkout: Option<&Path>| {
        let cache = dir.join(format!("cache-{name}"));
        std::fs::create_dir_all(&cache).unwrap();
        let image = dir.join(format!("{name}.qcow2"));
        let (imagebuild, agent) = match checkout {
            Some(c) => (c.join("target/debug/imagebuild"), c.join("target/release/foobar-agent")),
            None => (binary("imagebuild"), release_binary("foobar-agent")),
        };
        let (secs, _) = build_from(
            &imagebuild,
            &agent,
            &image,
            &built.key,
            &["--cache-dir".as_ref(), cache.as_os_str(), "--no-cache".as_ref()],
        );
        (image, secs)
    };
    let packages = |image: &Path| {
        let text = std::fs::read_to_string(support::sidecar(image, "manifest.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["packages"].clone()
    };
    let (again, secs) = cold("again", Some(&second));
    // When the Debian archive published new packages between the two builds, the second took other versions (other
    // bytes); a third build from scratch, from this checkout, must then match the second.
    let reference = if packages(&again) != packages(&built.image) {
        cold("third", None).0
    } else {
        built.image.clone()
    };
    assert_eq!(
        support::sha256sum(&again),
        support::sha256sum(&reference),
        "the qcow2 differs between two builds from scratch"
    );
    assert_eq!(
        support::sha256sum(&again.with_extension("raw")),
        support::sha256sum(&reference.with_extension("raw")),
        "the raw image differs between two builds from scratch"
    );

    let (ok, text) = verify(&built.image);
    assert!(ok && text.contains(": ok, sha256"), "{text}");
    let (ok, text) = verify(&built.raw);
    assert!(ok, "the raw output verifies against the manifest that lists it: {text}");

    // One byte changed in the middle of a copy: verify says so and fails.
    let damaged = dir.join("damaged.qcow2");
    std::fs::copy(&built.image, &damaged).unwrap();
    std::fs::copy(
        support::sidecar(&built.image, "manifest.json"),
        support::sidecar(&damaged, "manifest.json"),
    )
    .unwrap();
    let manifest = std::fs::read_to_string(support::sidecar(&damaged, "manifest.json"))
        .unwrap()
        .replace("foobar.qcow2", "damaged.qcow2");
    std::fs::write(support::sidecar(&damaged, "manifest.json"), manifest).unwrap();
    let (ok, text) = verify(&damaged);
    assert!(ok, "an intact copy verifies: {text}");
    let mut bytes = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&damaged)
        .unwrap();
    let middle = bytes.metadata().unwrap().len() / 2;
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut byte = [0u8; 1];
    bytes.seek(SeekFrom::Start(middle)).unwrap();
    bytes.read_exact(&mut byte).unwrap();
    bytes.seek(SeekFrom::Start(middle)).unwrap();
    bytes.write_all(&[byte[0] ^ 0x01]).unwrap();
    drop(bytes);
    let (ok, text) = verify(&damaged);
    assert!(!ok && text.contains("does not match its manifest"), "{text}");
    report(format!(
        "e2e rebuild figures: a second checkout at {} compiled in {compiled:.0} s; its build from scratch {secs:.0} s, \
         byte-identical qcow2 and raw",
        second.display()
    ));
}

/// Builds an example site (`examples/NAME/foobar.toml`) as qcow2 with the test key; returns the image and seconds.
fn build_example(name: &str) -> (PathBuf, f64) {
    let dir = support::temp_dir(&format!("e2e-{name}"));
    let image = dir.join(format!("{name}.qcow2"));
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{name}/foobar.toml"));
    let secs = build_config(&config, &image);
    (image, secs)
}

/// Builds the site of `config` as qcow2 at `image` with the test key; returns the seconds it took.
fn build_config(config: &Path, image: &Path) -> f64 {
    let pubkey = built().key.with_extension("pub");
    let (out, secs) = imagebuild_out(
        image,
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--ssh-key".as_ref(),
            pubkey.as_os_str(),
        ],
    );
    assert!(
        out.status.success(),
        "imagebuild --config {} failed:\n{}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

/// The full `/healthz` document, as an operator on the machine reads it (`foobar-agent health`, over SSH); from the
/// host, through nginx, only statuses and the version come back (checked here too).
fn detailed_health(guest: &Guest) -> serde_json::Value {
    // A client that claims to be on the machine is not believed: nginx sets that header itself.
    let (public, _) =
        crate::support::get_host_with(&guest.url("/healthz"), SITE, &[("X-Foobar-Health-Detail", "1")]).unwrap();
    assert!(
        !public.body.contains("output") && !public.body.contains("observedValue"),
        "the public /healthz carries detail: {}",
        public.body
    );
    let (_, text, err) = ssh(
        guest,
        &built().key,
        "admin",
        &[],
        "sudo /usr/local/bin/foobar-agent health",
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("foobar-agent health: {e}: {text}{err}"))
}

/// The app's entry in `/healthz` (`app:process`).
fn app_health(guest: &Guest) -> serde_json::Value {
    detailed_health(guest)["checks"]["app:process"][0].clone()
}

/// An example site boots to ready, passes the read-only smoke checks (the posts checks are skipped: the site runs its
/// own app), writes and reads a note through nginx, logs to the journal under the app's name, and comes back ready
/// within 30 s after its app process is killed.
fn example_site_works(name: &str, app: &str) {
    let _qemu = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let key = built().key.clone();
    let (image, build_secs) = build_example(name);
    let mut guest = Guest::boot(&image, false, false);
    let ready = guest.wait_ready();

    let (statuses, text) = smoke(&guest, &["--read-only"]);
    let skipped: Vec<&str> = statuses
        .iter()
        .filter(|(_, s)| *s == "skip")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(skipped, ["api-read", "api-write", "page-read", "page-write"], "{text}");
    assert!(statuses.values().all(|s| s == "pass" || s == "skip"), "{text}");
    assert!(text.contains(&format!("its own app `{app}`")), "{text}");

    // The app's page writes and reads a row of its own table (made by its migration) through nginx.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let marker = format!("e2e-{nanos} <b>bold</b>");
    let (posted, location) = support::post_form_host(&guest.url("/notes"), SITE, &[("body", &marker)]).unwrap();
    assert_eq!(posted.status, 303, "{}", posted.body);
    assert_eq!(location.as_deref(), Some("/notes"));
    let (page, headers) = get_host(&guest.url("/notes"), SITE).unwrap();
    assert_eq!(page.status, 200, "{}", page.body);
    let escaped = marker.replace('<', "&lt;").replace('>', "&gt;");
    assert!(
        page.body.contains(&escaped),
        "the note is on the page, escaped: {}",
        page.body
    );
    assert_eq!(
        header(&headers, "x-content-type-options"),
        Some("nosniff"),
        "nginx's headers on app pages"
    );
    let (bad, _) = support::post_form_host(&guest.url("/notes"), SITE, &[("body", "")]).unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    let health = app_health(&guest);
    assert_eq!(health["status"], "pass", "{health}");
    assert_eq!(health["componentId"], app);

    // Its own user, unit (cgroup) and database user, with rights on the site's schema only; the agent's unit keeps
    // its strict sandbox (the relaxations for interpreters are the app unit's alone).
    let app_pid = health["pid"].as_u64().expect("the app's pid");
    let run = |command: &str| {
        let (code, out, err) = ssh(&guest, &key, "admin", &[], command);
        assert_eq!(code, 0, "{command}: {out}{err}");
        out.trim().to_string()
    };
    assert_eq!(run(&format!("ps -o user= -p {app_pid}")), "foobar-app");
    assert!(run(&format!("cat /proc/{app_pid}/cgroup")).ends_with("/foobar-app.service"));
    assert_eq!(
        run("sudo -u foobar-app mariadb -N -B -e 'SELECT CURRENT_USER()'"),
        "foobar-app@localhost"
    );
    let (code, out, err) = ssh(
        &guest,
        &key,
        "admin",
        &[],
        "sudo -u foobar-app mariadb -N -B -e 'SELECT COUNT(*) FROM mysql.user'",
    );
    assert_ne!(code, 0, "the app's database user reads mysql.user: {out}");
    assert!(err.contains("denied"), "{err}");
    let sandboxes = run("systemctl show -p MemoryDenyWriteExecute --value foobar-agent foobar-app");
    assert_eq!(
        sandboxes.split_whitespace().collect::<Vec<_>>(),
        ["yes", "no"],
        "{sandboxes}"
    );
    // No route to the metadata addresses from the app's unit either.
    let denied = run("systemctl show -p IPAddressDeny --value foobar-app");
    assert!(denied.contains("169.254.0.0/16"), "{denied}");

    let (code, journal, err) = ssh(
        &guest,
        &key,
        "admin",
        &[],
        &format!("sudo journalctl -b -o cat -t {app}"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        journal.to_lowercase().contains("listening"),
        "the app's output is in the journal as {app}: {journal}"
    );

    // Killed: /readyz says so, then it is back within 30 s (Node.js took up to 9.8 s to answer again under emulation
    // when the machine was otherwise idle, and 15.0 s beside CI's other guest).
    let pid = health["pid"].as_u64().expect("the app's pid");
    let (code, _, err) = ssh(&guest, &key, "admin", &[], &format!("sudo kill -9 {pid}"));
    assert_eq!(code, 0, "{err}");
    support::wait_for_status_host(&guest.url("/readyz"), SITE, 503, Duration::from_secs(5));
    let back = support::wait_for_status_host(&guest.url("/readyz"), SITE, 200, Duration::from_secs(30));
    let health = app_health(&guest);
    assert_eq!(health["restarts"], 1, "{health}");
    assert_eq!(health["lastExit"], "killed by signal 9", "{health}");
    let (page, _) = get_host(&guest.url("/notes"), SITE).unwrap();
    assert!(page.body.contains(&escaped), "the note survived the restart");
    report(format!(
        "{name} example: build {build_secs:.0} s, ready {ready:.1} s, back {:.1} s after SIGKILL of the app",
        back.as_secs_f64()
    ));
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn the_flask_example_runs_under_the_agent_behind_nginx() {
    example_site_works("flask", "notes-flask");
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn the_node_example_runs_under_the_agent_behind_nginx() {
    example_site_works("node", "notes-node");
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn a_package_the_archive_does_not_have_fails_the_build_naming_the_key() {
    let dir = support::temp_dir("e2e-badpkg");
    std::fs::create_dir_all(dir.join("app")).unwrap();
    let config = dir.join("foobar.toml");
    std::fs::write(
        &config,
        "[app]\nfiles = \"app\"\ncommand = [\"server\", \"{port}\"]\npackages = [\"no-such-package-foobar\"]\n",
    )
    .unwrap();
    let image = dir.join("never.qcow2");
    let (out, _) = imagebuild_out(&image, &["--config".as_ref(), config.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("key `app.packages`: the Debian archive (bookworm) has no package `no-such-package-foobar`"),
        "{stderr}"
    );
    assert!(!image.exists(), "a failed build leaves no image");
}

/// The cloud formats of the same build: each listed in the manifest with its hash, read by qemu-img or GNU tar.
fn build_cloud_formats(dir: &Path) -> PathBuf {
    let vmdk = dir.join("foobar.vmdk");
    let pubkey = built().key.with_extension("pub");
    let mut args: Vec<&std::ffi::OsStr> = [
        "--format", "vmdk", "--format", "vhd", "--format", "tar.gz", "--format", "ova",
    ]
    .iter()
    .map(|a| a.as_ref())
    .collect();
    args.extend(["--ssh-key".as_ref(), pubkey.as_os_str()]);
    let (out, secs) = imagebuild_out(&vmdk, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(support::sidecar(&vmdk, "manifest.json")).unwrap()).unwrap();
    let outputs = manifest["outputs"].as_array().expect("outputs in the manifest");
    let mut formats = Vec::new();
    for output in outputs {
        let path = PathBuf::from(output["path"].as_str().unwrap());
        assert_eq!(output["sha256"], support::sha256sum(&path), "{}", path.display());
        formats.push(output["format"].as_str().unwrap().to_string());
    }
    assert_eq!(formats, ["vmdk", "vhd", "tar.gz", "ova"]);
    let listing = |archive: &Path| {
        let out = Command::new("tar").arg("-tf").arg(archive).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(listing(&dir.join("foobar.tar.gz")), ["disk.raw"]);
    assert_eq!(
        listing(&dir.join("foobar.ova")),
        ["foobar.ovf", "foobar.mf", "foobar-disk1.vmdk"]
    );
    report(format!("cloud formats (vmdk, vhd, tar.gz, ova) built in {secs:.0} s"));
    vmdk
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn the_raw_vmdk_and_vhd_outputs_boot_and_the_guest_has_every_clouds_drivers() {
    let _qemu = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let built = built();
    let dir = support::temp_dir("e2e-formats");
    let vmdk = build_cloud_formats(&dir);
    let vhd = dir.join("foobar.vhd");

    let mut times = Vec::new();
    for image in [&built.raw, &vmdk, &vhd] {
        let mut guest = Guest::boot(image, false, false);
        let ready = guest.wait_ready();
        times.push(format!("{} {ready:.1} s", image.extension().unwrap().to_string_lossy()));
        if image != &built.raw {
            continue;
        }
        // The drivers of each platform: virtio (QEMU/KVM, GCE), NVMe and ENA (AWS Nitro), gVNIC (GCE), Hyper-V
        // storage and network (Azure), VMware's paravirtual SCSI and VMXNET3; the root-disk ones in the initramfs too.
        let (code, found, err) = ssh(
            &guest,
            &built.key,
            "admin",
            &[],
            "for m in virtio_net virtio_blk virtio_scsi nvme ena gve hv_vmbus hv_storvsc hv_netvsc vmw_pvscsi vmxnet3; \
             do printf '%s %s\\n' $m \"$(/sbin/modinfo -n $m 2>&1)\"; done",
        );
        assert_eq!(code, 0, "{err}");
        for line in found.lines() {
            let (module, path) = line.split_once(' ').unwrap();
            assert!(
                path == "(builtin)" || path.ends_with(".ko") || path.ends_with(".ko.xz") || path.ends_with(".ko.zst"),
                "driver {module} missing: {path}"
            );
        }
        assert_eq!(found.lines().count(), 11, "{found}");
        let (code, initrd, err) = ssh(
            &guest,
            &built.key,
            "admin",
            &[],
            "sudo lsinitramfs /boot/initrd.img-$(uname -r)",
        );
        assert_eq!(code, 0, "{err}");
        for module in [
            "virtio_blk",
            "virtio_scsi",
            "virtio_pci",
            "hv_storvsc",
            "hv_vmbus",
            "vmw_pvscsi",
            "virtio_net",
            "ena",
            "gve",
            "hv_netvsc",
            "vmxnet3",
        ] {
            assert!(
                initrd.lines().any(|l| l.contains(&format!("/{module}.ko"))),
                "{module} not in the initramfs"
            );
        }
        // The initramfs loads the network driver this hardware asks for (QEMU's virtio NIC) and no other; the
        // kernel skips its crypto self-tests; KVM's modules stay unloaded; nginx does not wait for the network.
        let (code, boot, err) = ssh(
            &guest,
            &built.key,
            "admin",
            &[],
            "sudo journalctl -b -o cat -t foobar-init --grep 'network drivers'; \
             cat /sys/module/cryptomgr/parameters/notests; grep -c '^kvm' /proc/modules; \
             systemctl show -p After -p Wants nginx.service",
        );
        assert_eq!(code, 0, "{boot}{err}");
        let mut lines = boot.lines();
        let loaded = lines.next().unwrap_or_default();
        assert!(
            loaded.starts_with("network drivers loaded after ") && loaded.ends_with(" ms: virtio_net"),
            "{boot}"
        );
        assert_eq!(lines.next(), Some("Y"), "cryptomgr.notests: {boot}");
        assert_eq!(lines.next(), Some("0"), "kvm modules loaded: {boot}");
        assert!(
            !boot.contains("network-online.target"),
            "nginx waits for network-online: {boot}"
        );
        // With no cloud in DMI, first boot asks no metadata service and waits for none.
        let (_, log, _) = ssh(
            &guest,
            &built.key,
            "admin",
            &[],
            "sudo journalctl -b -o cat -u foobar-firstboot",
        );
        let line = log
            .lines()
            .find(|l| l.starts_with("platform none"))
            .unwrap_or_else(|| panic!("{log}"));
        let secs: f64 = line
            .rsplit('(')
            .next()
            .unwrap()
            .trim_end_matches(" s)")
            .parse()
            .unwrap();
        assert!(secs < 2.0, "instance-config took {secs} s without metadata: {line}");
        times.push(format!("(instance-config without metadata {secs:.2} s)"));
        // Logs are bounded: the journal has its ceiling, and nginx's logs rotate (forced here) with nginx writing on.
        let (_, journald, _) = ssh(
            &guest,
            &built.key,
            "admin",
            &[],
            "sudo journalctl -b -o cat -u systemd-journald",
        );
        assert!(
            journald.contains("max 200.0M") || journald.contains("max 32.0M"),
            "the journal's ceiling: {journald}"
        );
        let (code, rotated, err) = ssh(
            &guest,
            &built.key,
            "admin",
            &[],
            "systemctl show -p TimersCalendar logrotate.timer && sudo logrotate -f /etc/logrotate.d/nginx && \
             sleep 1 && ls /var/log/nginx",
        );
        assert_eq!(code, 0, "{rotated}{err}");
        assert!(
            rotated.contains("*:00/5") || rotated.contains("*:0/5"),
            "every 5 minutes: {rotated}"
        );
        assert!(rotated.contains("access.log.1"), "rotated: {rotated}");
        get_host(&guest.url("/"), SITE).unwrap();
        let (_, size, _) = ssh(
            &guest,
            &built.key,
            "admin",
            &[],
            "sudo stat -c %s /var/log/nginx/access.log",
        );
        assert!(
            size.trim().parse::<u64>().unwrap_or(0) > 0,
            "nginx writes to the new log: {size}"
        );
        let (_, cmdline, _) = ssh(&guest, &built.key, "admin", &[], "cat /proc/cmdline");
        assert!(cmdline.contains("console=ttyS0"), "serial console: {cmdline}");
        let (_, networks, _) = ssh(&guest, &built.key, "admin", &[], "networkctl list --no-legend");
        assert!(
            networks.contains("routable") || networks.contains("configured"),
            "DHCP on the NIC: {networks}"
        );
    }
    report(format!("ready from other formats: {}", times.join(", ")));
}

/// A key pair that only the metadata service hands out (the image was built with another).
fn metadata_key() -> (PathBuf, String) {
    let dir = support::temp_dir("e2e-metakey");
    let key = dir.join("id_meta");
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "from-metadata", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(ok.success());
    let public = std::fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string();
    (key, public)
}

/// Boots the image as `platform` with `server` as its metadata service; the guest must take its hostname and the
/// metadata's SSH key (a login with that key works). Returns the guest and its boot-to-ready seconds.
fn boot_on_platform(
    platform: &str,
    server: &crate::support::fake_http::FakeHttp,
    key: &Path,
    hostname: &str,
) -> (Guest, f64) {
    let extra = [
        "--platform".to_string(),
        platform.to_string(),
        "--metadata".to_string(),
        server.port.to_string(),
    ];
    let mut guest = Guest::boot_full(&built().image, false, false, &[], &extra);
    let ready = guest.wait_ready();
    let (code, name, err) = ssh(&guest, key, "admin", &[], "hostname");
    assert_eq!(
        code,
        0,
        "{platform}: SSH with the key from the metadata: {err}\n{}",
        guest.console_tail()
    );
    assert_eq!(name, hostname, "{platform}");
    (guest, ready)
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn each_clouds_metadata_gives_the_instance_its_hostname_and_ssh_key() {
    let _qemu = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    use crate::instance;
    use crate::support::fake_http::FakeHttp;
    let (key, public) = metadata_key();
    let mut times = Vec::new();

    let ec2 = FakeHttp::start(instance::ec2(instance::Imds::Required, &public, None, true));
    let (guest, ready) = boot_on_platform("ec2", &ec2, &key, "ip-10-1-2-3");
    drop(guest);
    let requests = ec2.requests();
    assert_eq!(requests[0].method, "PUT", "IMDSv2 token first: {requests:?}");
    times.push(format!("ec2 {ready:.1} s"));

    let gce = FakeHttp::start(instance::gce(instance::GceMetadata::simple(&public)));
    let (guest, ready) = boot_on_platform("gce", &gce, &key, "www-1");
    drop(guest);
    times.push(format!("gce {ready:.1} s"));

    let azure = FakeHttp::start(instance::azure(&public, instance::AzureState::new()));
    let (guest, ready) = boot_on_platform("azure", &azure, &key, "www-azure");
    // Ready is reported once per boot by its own unit, after first boot (not waiting for the site).
    let deadline = Instant::now() + Duration::from_secs(30);
    let reports = || {
        azure
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .collect::<Vec<_>>()
    };
    while reports().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let posted = reports();
    assert_eq!(
        posted.len(),
        1,
        "exactly one health report: {posted:?}\n{}",
        guest.console_tail()
    );
    assert!(
        posted[0].path == "/machine?comp=health" && posted[0].body.contains("<State>Ready</State>"),
        "{posted:?}"
    );
    drop(guest);
    times.push(format!("azure {ready:.1} s"));

    // NoCloud: a `cidata` volume made the way cloud-localds makes its vfat variant, with multi-part user data (as
    // write-mime-multipart makes it): cloud-config in flow style, and a fragment with the site's certificate.
    let dir = support::temp_dir("e2e-seed");
    let (cert_file, key_file) = support::self_signed_certificate(&dir, &[SITE, "foobar.com"]);
    let (cert, tls_key) = (
        std::fs::read_to_string(&cert_file).unwrap(),
        std::fs::read_to_string(&key_file).unwrap(),
    );
    std::fs::write(dir.join("meta-data"), "instance-id: i-7\nlocal-hostname: web-7\n").unwrap();
    let boundary = "===============0714326093214716097==";
    std::fs::write(
        dir.join("user-data"),
        format!(
            "Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n--{boundary}\n\
             Content-Type: text/cloud-config; charset=\"us-ascii\"\nMIME-Version: 1.0\n\n\
             #cloud-config\nssh_authorized_keys: [\"{public}\"]\n\n--{boundary}\n\
             Content-Type: text/plain; charset=\"us-ascii\"\nMIME-Version: 1.0\n\n{}\n--{boundary}--\n",
            instance::tls_fragment(&cert, &tls_key)
        ),
    )
    .unwrap();
    let extra = ["--seed".to_string(), nocloud_seed(&dir).display().to_string()];
    let mut guest = Guest::boot_full(&built().image, false, false, &[], &extra);
    let ready = guest.wait_ready();
    let (code, name, err) = ssh(&guest, &key, "admin", &[], "hostname");
    assert_eq!(code, 0, "nocloud: SSH with the seed's key: {err}");
    assert_eq!(name, "web-7");
    // HTTPS serves the certificate the instance configuration carried, not a self-signed one of the image's.
    let expected = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert_file)
        .output()
        .unwrap();
    let expected = String::from_utf8_lossy(&expected.stdout);
    let (served, text) = tls_certificate(&guest);
    assert!(expected.contains(&served), "served {text}, expected {expected}");
    times.push(format!("nocloud {ready:.1} s"));
    report(format!("ready with metadata: {}", times.join(", ")));
}

/// A `cidata` volume of `dir`'s `meta-data` and `user-data`, made the way cloud-localds makes its vfat variant.
fn nocloud_seed(dir: &Path) -> PathBuf {
    let seed = dir.join("seed.img");
    let made = Command::new("mkfs.fat")
        .args(["-C", "-n", "CIDATA"])
        .arg(&seed)
        .arg("1024")
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    for file in ["meta-data", "user-data"] {
        let copied = Command::new("mcopy")
            .arg("-i")
            .arg(&seed)
            .arg(dir.join(file))
            .arg("::")
            .status()
            .unwrap();
        assert!(copied.success());
    }
    seed
}

/// A copy of the static example in a scratch directory (so a file can be changed), and its config.
fn static_example_copy() -> PathBuf {
    example_copy("static")
}

/// A copy of `examples/NAME` in a scratch directory (so a file can be changed or added), and its config.
fn example_copy(name: &str) -> PathBuf {
    let dir = support::temp_dir(&format!("e2e-{name}-copy"));
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{name}"));
    let status = Command::new("cp")
        .arg("-r")
        .arg(&example)
        .arg(dir.join(name))
        .status()
        .unwrap();
    assert!(status.success());
    dir.join(format!("{name}/foobar.toml"))
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn the_static_example_is_served_with_its_types_compression_caching_and_error_pages() {
    let _qemu = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let (image, build_secs) = build_example("static");

    // Reproducible and cheap to change: the same site gives the same bytes; a changed file rebuilds only the
    // overlay (the package layer comes from the cache) and gives other bytes.
    let config = static_example_copy();
    let again = config.with_file_name("again.qcow2");
    let pubkey = built().key.with_extension("pub");
    let args = |config: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "--config".into(),
            config.as_os_str().to_owned(),
            "--ssh-key".into(),
            pubkey.as_os_str().to_owned(),
        ]
    };
    let (out, _) = imagebuild_out(&again, &args(&config));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        support::sha256sum(&again),
        support::sha256sum(&image),
        "two builds of one site differ"
    );
    std::fs::write(
        config.with_file_name("public/about/index.html"),
        "<!doctype html><title>About</title><p>changed</p>\n",
    )
    .unwrap();
    let changed = config.with_file_name("changed.qcow2");
    let (out, changed_secs) = imagebuild_out(&changed, &args(&config));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("package layer from cache") && !log.contains("bootstrap_rootfs: started"),
        "a changed site file rebuilt the package layer:\n{log}"
    );
    assert_ne!(support::sha256sum(&changed), support::sha256sum(&image));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(support::sidecar(&changed, "manifest.json")).unwrap()).unwrap();
    let files = manifest["inputs"]["site"]["files"]
        .as_array()
        .expect("the site's files in the manifest");
    assert!(
        files
            .iter()
            .any(|f| f["path"] == "about/index.html" && f["sha256"].as_str().is_some_and(|h| h.len() == 64)),
        "{files:?}"
    );

    let mut guest = Guest::boot(&image, false, false);
    let ready = guest.wait_ready();
    let (statuses, text) = smoke(&guest, &[]);
    assert!(statuses.values().all(|s| s == "pass"), "{text}");
    assert!(
        text.contains("/css/site.3f9a2b1c.css"),
        "smoke follows the site's own asset: {text}"
    );

    let fetch = |path: &str, headers: &[(&str, &str)]| {
        support::get_host_with(&guest.url(path), SITE, headers).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    // Every common web type, by its extension.
    for (path, media) in [
        ("/", "text/html"),
        ("/about/", "text/html"),
        ("/css/site.3f9a2b1c.css", "text/css"),
        ("/js/app.mjs", "application/javascript"),
        ("/data.json", "application/json"),
        ("/img/logo.svg", "image/svg+xml"),
        ("/img/pixel.webp", "image/webp"),
        ("/img/pixel.avif", "image/avif"),
        ("/fonts/example.woff2", "font/woff2"),
        ("/app.wasm", "application/wasm"),
        ("/doc.pdf", "application/pdf"),
    ] {
        let (reply, headers) = fetch(path, &[]);
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        let got = header(&headers, "content-type").unwrap_or("");
        assert!(got.starts_with(media), "{path}: Content-Type `{got}`, expected {media}");
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"), "{path}");
    }
    // Compression: a ready-made .gz for the stylesheet, on the fly for the script; neither without Accept-Encoding.
    for path in ["/css/site.3f9a2b1c.css", "/js/app.mjs"] {
        let (_, headers) = fetch(path, &[("Accept-Encoding", "gzip")]);
        assert_eq!(
            header(&headers, "content-encoding"),
            Some("gzip"),
            "{path}: {headers:?}"
        );
        assert!(
            header(&headers, "vary").is_some_and(|v| v.contains("Accept-Encoding")),
            "{path}"
        );
        let (_, plain) = fetch(path, &[]);
        assert_eq!(header(&plain, "content-encoding"), None, "{path}");
    }
    // Caching: a year and immutable for the fingerprinted file; a minute and revalidation for pages.
    let (_, css) = fetch("/css/site.3f9a2b1c.css", &[]);
    let cache = headers_joined(&css, "cache-control");
    assert!(
        cache.contains("max-age=31536000") && cache.contains("immutable"),
        "{cache}"
    );
    assert!(header(&css, "expires").is_some());
    let (_, page) = fetch("/about/", &[]);
    assert!(
        headers_joined(&page, "cache-control").contains("max-age=60"),
        "{page:?}"
    );
    let etag = header(&page, "etag").expect("pages carry an ETag").to_string();
    assert!(header(&page, "last-modified").is_some());
    let (revalidated, _) = fetch("/about/", &[("If-None-Match", &etag)]);
    assert_eq!(revalidated.status, 304);
    // The site's own 404 page, no directory listing, no dot-file.
    let (missing, _) = fetch("/no/such/page.html", &[]);
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("example-site-404"), "{}", missing.body);
    let (listing, _) = fetch("/img/", &[]);
    assert_eq!(
        listing.status, 404,
        "a directory without index.html is not listed: {}",
        listing.body
    );
    assert!(!listing.body.contains("pixel.webp"));
    for path in ["/.env", "/.git/config", "/css/.htaccess"] {
        let (dot, _) = fetch(path, &[]);
        assert_eq!(dot.status, 404, "{path}");
        assert!(!dot.body.contains("SECRET"), "{path}: {}", dot.body);
    }
    // The built-in app still answers beside the site.
    let (posts, _) = fetch("/api/posts", &[]);
    assert_eq!(posts.status, 200, "{}", posts.body);
    report(format!(
        "static example: build {build_secs:.0} s, rebuild after a changed file {changed_secs:.0} s (layer cached), \
         ready {ready:.1} s"
    ));
}

/// Every value of a header (nginx may send `Cache-Control` twice), joined with ", ".
fn headers_joined(headers: &[(String, String)], name: &str) -> String {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pebble, the ACME test server (Debian package `pebble`), on 127.0.0.1: its API over HTTPS with a certificate for
/// 10.0.2.2 (the host as a QEMU guest sees it), validating HTTP-01 challenges on `http_port` and resolving names
/// with `dns`. Certificates it issues are valid for `validity`. Stopped when dropped.
struct Pebble {
    child: Child,
    dir: PathBuf,
    api: u16,
    management: u16,
    http_port: u16,
}

impl Pebble {
    fn start(dns: &str, validity: Duration) -> Pebble {
        let dir = support::temp_dir("pebble");
        let (cert, key) = support::self_signed_certificate(&dir, &["localhost", "10.0.2.2", "127.0.0.1"]);
        let ports = support::free_port_block(4);
        let (api, management, http_port, tls_port) = (ports, ports + 1, ports + 2, ports + 3);
        let config = json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{api}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": cert,
            "privateKey": key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity.as_secs(),
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", dns])
            // No random validation delays; no nonces refused at random (uacme retries those, but each costs time).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pebble (apt-get install pebble; `just deps` does)");
        let pebble = Pebble {
            child,
            dir,
            api,
            management,
            http_port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", api)).is_err() {
            assert!(Instant::now() < deadline, "pebble did not listen: {}", pebble.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        pebble
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }

    /// Its API certificate: what a client must trust to talk to it.
    fn api_certificate(&self) -> String {
        std::fs::read_to_string(self.dir.join("cert.pem")).unwrap()
    }

    /// The root its certificates chain to (random per run), from the management API.
    fn root(&self) -> PathBuf {
        let path = self.dir.join("root.pem");
        let out = Command::new("curl")
            .args(["-sSf", "--cacert"])
            .arg(self.dir.join("cert.pem"))
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .arg("-o")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pebble root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` against the guest's HTTPS as `https://www.foobar.com/...`, verifying against `ca`: (status line and
/// headers, HTTP version); panics naming curl's error when verification or the request fails.
fn https_verified(guest: &Guest, ca: &Path, path: &str) -> (String, String) {
    let port = guest.port + 1;
    let out = Command::new("curl")
        .args([
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--http2",
            "-w",
            "%{http_version}",
            "--cacert",
        ])
        .arg(ca)
        .args(["--resolve", &format!("{SITE}:{port}:127.0.0.1")])
        .arg(format!("https://{SITE}:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "HTTPS verified against {}: {}",
        ca.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = text.lines().last().unwrap_or("").to_string();
    (text, version)
}

/// The serial number of the certificate the guest serves.
fn served_serial(guest: &Guest) -> String {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{} -servername {SITE} </dev/null 2>/dev/null | openssl x509 -noout -serial -issuer",
        guest.port + 1
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn a_certificate_from_an_acme_ca_is_issued_renewed_and_turns_on_https_only() {
    let built = built();
    // Both names at 127.0.0.1, where the guest's port 80 is forwarded, for Pebble's validation.
    let dns = support::Dns::start(Some("127.0.0.1"));
    // Ten days of validity: below the default 30 renewal days, so every run of the renewal renews.
    let pebble = Pebble::start(&dns.server(), Duration::from_secs(10 * 86400));
    // The instance configuration turns ACME on and points it at Pebble, whose API certificate it trusts.
    let dir = support::temp_dir("e2e-acme-seed");
    std::fs::write(dir.join("meta-data"), "instance-id: i-acme\n").unwrap();
    std::fs::write(
        dir.join("user-data"),
        format!(
            "#foobar-config\n[acme]\nenabled = true\ndirectory = \"https://10.0.2.2:{}/dir\"\n\
             email = \"ops@foobar.com\"\nca-certificate = \"\"\"\n{}\"\"\"\n",
            pebble.api,
            pebble.api_certificate()
        ),
    )
    .unwrap();
    let extra = ["--seed".to_string(), nocloud_seed(&dir).display().to_string()];
    let mut guest = Guest::boot_full(&built.image, false, false, &[(pebble.http_port, 80)], &extra);
    guest.wait_ready();
    // Until the CA has issued one, the self-signed certificate serves; then Pebble's.
    let started = Instant::now();
    let issued = loop {
        let serial = served_serial(&guest);
        if serial.contains("Pebble") {
            break serial;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "no certificate from Pebble after 180 s (serving: {serial}); pebble:\n{}\njournal:\n{}",
            pebble.log(),
            ssh(
                &guest,
                &built.key,
                "admin",
                &[],
                "sudo journalctl -u foobar-acme --no-pager | tail -20"
            )
            .1
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let issue_time = started.elapsed().as_secs_f64();
    let root = pebble.root();
    // Verified against Pebble's root, over HTTP/2, with HSTS.
    let (headers, version) = https_verified(&guest, &root, "/");
    assert_eq!(version, "2", "HTTP/2 on 443: {headers}");
    assert!(
        headers.contains("strict-transport-security: max-age=31536000"),
        "HSTS: {headers}"
    );
    // HTTP redirects to HTTPS, except the health endpoints (load balancers ask over HTTP) and ACME challenges.
    let plain = ureq::AgentBuilder::new().redirects(0).build();
    let answer = plain.get(&guest.url("/")).set("Host", SITE).call().unwrap();
    assert_eq!(answer.status(), 301, "HTTP / redirects");
    assert_eq!(answer.header("location"), Some(format!("https://{SITE}/").as_str()));
    assert!(
        answer.header("strict-transport-security").is_none(),
        "no HSTS over HTTP"
    );
    let answer = plain.get(&guest.url("/readyz")).set("Host", SITE).call().unwrap();
    assert_eq!(answer.status(), 200, "/readyz over HTTP is not redirected");
    let answer = plain.get(&guest.url("/")).set("Host", "foobar.com").call().unwrap();
    assert_eq!(
        answer.header("location"),
        Some(format!("https://{SITE}/").as_str()),
        "the bare domain"
    );
    let missing = plain
        .get(&guest.url("/.well-known/acme-challenge/none"))
        .set("Host", SITE)
        .call();
    assert!(
        matches!(missing, Err(ureq::Error::Status(404, _))),
        "a challenge path is not redirected: {missing:?}"
    );
    // The machine's /healthz names the certificate.
    let health = detailed_health(&guest);
    assert_eq!(health["checks"]["tls:certificate"][0]["status"], "pass", "{health}");
    // Renewal (ten days left, fewer than 30): the timer's service issues a new one and nginx reloads into it.
    let (code, _, err) = ssh(
        &guest,
        &built.key,
        "admin",
        &[],
        "sudo systemctl start foobar-acme.service",
    );
    assert_eq!(code, 0, "{err}");
    let started = Instant::now();
    loop {
        let serial = served_serial(&guest);
        if serial.contains("Pebble") && serial != issued {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not renewed: still {serial}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    https_verified(&guest, &root, "/");
    let (_, journal, _) = ssh(
        &guest,
        &built.key,
        "admin",
        &[],
        "sudo journalctl -o short-monotonic -u foobar-acme -u nginx --no-pager | tail -12",
    );
    report(format!(
        "ACME: Pebble's certificate served {issue_time:.1} s after ready; renewed in {:.1} s; the journal:\n{journal}",
        started.elapsed().as_secs_f64()
    ));
}

/// The guest's console has printed `text`, within the ready limit.
fn wait_console(guest: &mut Guest, text: &str) -> f64 {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(&guest.serial)
            .unwrap_or_default()
            .contains(text)
        {
            return start.elapsed().as_secs_f64();
        }
        if let Some(status) = guest.child.try_wait().unwrap() {
            panic!(
                "QEMU exited ({status}) before `{text}`; console:\n{}",
                guest.console_tail()
            );
        }
        assert!(
            start.elapsed() < READY_LIMIT,
            "no `{text}` on the console:\n{}",
            guest.console_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn the_power_button_shuts_the_machine_down_whenever_it_is_pressed_during_boot() {
    // Each boot is a first boot (the disk is a throwaway snapshot); the button is pressed once, at one moment: as soon
    // as the early watch has it (MariaDB is starting then), when first boot ends, and when the site is ready.
    let moments = [
        ("the early watch begins", "foobar-power-button: watching"),
        ("first boot ends", "foobar-firstboot: done"),
        ("/readyz answers 200", ""),
    ];
    let mut figures = Vec::new();
    for (moment, console) in moments {
        let mut guest = Guest::boot(&built().image, false, false);
        let at = if console.is_empty() {
            guest.wait_ready()
        } else {
            wait_console(&mut guest, console)
        };
        let took = guest.power_button();
        assert!(
            took < Duration::from_secs(30),
            "pressed when {moment}: off after {took:?}; console:\n{}",
            guest.console_tail()
        );
        figures.push(format!(
            "{moment} ({at:.1} s after start): off in {:.1} s",
            took.as_secs_f64()
        ));
    }
    report(format!("power button: {}", figures.join("; ")));
}

#[test]
#[ignore = "QEMU tier, minutes: run with `just e2e` (FOOBAR_E2E=1 just test, which passes --include-ignored)"]
fn a_data_disk_keeps_the_sites_rows_across_a_new_build_and_a_foreign_disk_is_never_written() {
    let _qemu = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let key = built().key.clone();
    let dir = support::temp_dir("e2e-data-disk");
    let data = dir.join("data.qcow2");
    let disk_flag = |disk: &Path| vec!["--data-disk".to_string(), disk.display().to_string()];

    // Build A (the Flask example) on a new, empty data disk: first boot formats it and puts the database there.
    let config = example_copy("flask");
    let image_a = dir.join("a.qcow2");
    let build_a = build_config(&config, &image_a);
    let mut guest = Guest::boot_full(&image_a, false, false, &[], &disk_flag(&data));
    let ready_a = guest.wait_ready();
    let console = std::fs::read_to_string(&guest.serial).unwrap();
    assert!(
        console.contains("is empty: making an ext4 file system labelled foobar-data"),
        "{console}"
    );
    let (code, source, err) = ssh(&guest, &key, "admin", &[], "findmnt -no SOURCE /var/lib/foobar-data");
    assert_eq!((code, source.as_str()), (0, "/dev/vdb"), "{err}");
    let marker = format!("kept across builds {}", support::free_port());
    let (posted, _) = support::post_form_host(&guest.url("/notes"), SITE, &[("body", &marker)]).unwrap();
    assert_eq!(posted.status, 303, "{}", posted.body);
    let off_a = guest.power_button();
    drop(guest);

    // Build B: a new migration and a new file. Booted with the same data disk, it keeps the row and applies only
    // the new migration.
    let example = config.parent().unwrap();
    std::fs::write(
        example.join("migrations/0002_visits.sql"),
        "CREATE TABLE visits (id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY) ENGINE=InnoDB;\n",
    )
    .unwrap();
    std::fs::write(example.join("app/build.txt"), "B\n").unwrap();
    let image_b = dir.join("b.qcow2");
    let build_b = build_config(&config, &image_b);
    assert_ne!(
        support::sha256sum(&image_a),
        support::sha256sum(&image_b),
        "B is another build"
    );
    let mut guest = Guest::boot_full(&image_b, false, false, &[], &disk_flag(&data));
    let ready_b = guest.wait_ready();
    let console = std::fs::read_to_string(&guest.serial).unwrap();
    assert!(console.contains("/dev/vdb holds a database: using it"), "{console}");
    assert!(!console.contains("making an ext4"), "{console}");
    let (page, _) = get_host(&guest.url("/notes"), SITE).unwrap();
    assert!(
        page.body.contains(&marker),
        "the note written under build A: {}",
        page.body
    );
    let (code, applied, err) = ssh(
        &guest,
        &key,
        "admin",
        &[],
        "sudo mariadb -N -B foobar -e 'SELECT version, COUNT(*) FROM _sqlx_migrations GROUP BY version ORDER BY version'",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        applied
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        [["1", "1"], ["2", "1"]],
        "each migration applied once: {applied}"
    );
    let (code, out, err) = ssh(
        &guest,
        &key,
        "admin",
        &[],
        "sudo mariadb -N -B foobar -e 'SELECT COUNT(*) FROM visits'",
    );
    assert_eq!((code, out.as_str()), (0, "0"), "{err}");
    let off_b = guest.power_button();
    drop(guest);

    // A disk that holds something else (here a FAT file system) is never written, and MariaDB does not start on
    // the root disk instead.
    let foreign = dir.join("foreign.raw");
    let made = Command::new("mkfs.fat")
        .args(["-C", "-n", "PHOTOS"])
        .arg(&foreign)
        .arg("65536")
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let before = support::sha256sum(&foreign);
    let mut guest = Guest::boot_full(&image_b, false, false, &[], &disk_flag(&foreign));
    wait_console(
        &mut guest,
        "not an ext4 file system labelled foobar-data: nothing was written to it",
    );
    support::wait_for_status_host(&guest.url("/readyz"), SITE, 503, READY_LIMIT);
    let (code, state, _) = ssh(&guest, &key, "admin", &[], "systemctl is-active mariadb");
    assert_ne!(code, 0, "MariaDB runs beside a foreign data disk: {state}");
    let _ = guest.power_button();
    drop(guest);
    assert_eq!(support::sha256sum(&foreign), before, "the foreign disk was written to");
    report(format!(
        "data disk: build A {build_a:.0} s, ready {ready_a:.1} s on a new disk, off {:.1} s; build B {build_b:.0} s, \
         ready {ready_b:.1} s on the kept disk, off {:.1} s",
        off_a.as_secs_f64(),
        off_b.as_secs_f64()
    ));
}
