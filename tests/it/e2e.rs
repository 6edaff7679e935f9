//! The QEMU tier: build the real image once, boot it under SeaBIOS and under OVMF, and check the site over HTTP
//! through nginx; power it off with the ACPI button and boot the same disk again. Runs only with `FOOBAR_E2E=1`
//! (CI sets it): it takes minutes.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{self, binary, get_host, post_json_host, release_binary};

const SITE: &str = "www.foobar.com";
const READY_LIMIT: Duration = Duration::from_secs(300);

fn enabled() -> bool {
    if std::env::var("FOOBAR_E2E").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("QEMU tier skipped: set FOOBAR_E2E=1 to build and boot the image (`just e2e`)");
    false
}

/// A guest started with `imagebuild boot`; killed when dropped.
struct Guest {
    child: Child,
    port: u16,
    serial: PathBuf,
    monitor: PathBuf,
}

impl Guest {
    fn boot(image: &Path, uefi: bool, write: bool) -> Guest {
        let dir = support::temp_dir("guest");
        let port = support::free_port();
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
        let child = cmd.stdout(Stdio::null()).spawn().expect("imagebuild boot starts");
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
        let text = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Seconds from now until `/readyz` answers 200 through nginx.
    fn wait_ready(&mut self) -> f64 {
        let start = Instant::now();
        loop {
            if let Ok((r, _)) = get_host(&self.url("/readyz"), SITE) {
                if r.status == 200 {
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

/// What every booted guest must serve, through nginx with the site's Host header.
fn check_site(guest: &Guest) {
    let (page, headers) = get_host(&guest.url("/"), SITE).unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(page.content_type, "text/html");
    assert!(page.body.contains("Welcome to foobar"), "{}", page.body);
    assert_eq!(
        header(&headers, "server"),
        Some("nginx"),
        "nginx serves it, without its version"
    );

    let (css, headers) = get_host(&guest.url("/static/site.css"), SITE).unwrap();
    assert_eq!(css.status, 200);
    assert_eq!(css.content_type, "text/css");
    assert!(
        header(&headers, "cache-control").is_some_and(|v| v.contains("max-age=604800")),
        "{headers:?}"
    );
    assert!(header(&headers, "expires").is_some(), "{headers:?}");

    let (redirect, headers) = get_host(&guest.url("/posts?x=1"), "foobar.com").unwrap();
    assert_eq!(redirect.status, 301);
    assert_eq!(header(&headers, "location"), Some("http://www.foobar.com/posts?x=1"));

    match get_host(&guest.url("/"), "intruder.example") {
        Err(_) => {} // nginx closed the connection (444)
        Ok((r, _)) => panic!("an unknown Host got an answer: {} {}", r.status, r.body),
    }

    let (metrics, _) = get_host(&guest.url("/metrics"), SITE).unwrap();
    assert_eq!(metrics.status, 404, "/metrics is not served to outside clients");
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed().as_secs_f64())
}

#[test]
fn the_image_boots_under_bios_and_uefi_serves_the_site_and_keeps_data_across_power_off() {
    if !enabled() {
        return;
    }
    let dir = support::temp_dir("e2e");
    let image = dir.join("foobar.qcow2");
    let raw = dir.join("foobar.raw");
    let (out, build_secs) = timed(|| {
        Command::new(binary("imagebuild"))
            .args(["--out"])
            .arg(&image)
            .args(["--format", "qcow2", "--format", "raw", "--agent-bin"])
            .arg(release_binary("foobar-agent"))
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "imagebuild failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

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
    let (health, _) = get_host(&bios.url("/healthz"), SITE).unwrap();
    assert_eq!(
        health.json()["checks"]["migrations:version"][0]["appliedThisStart"],
        1,
        "{}",
        health.body
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
    let (health, _) = get_host(&again.url("/healthz"), SITE).unwrap();
    let check = &health.json()["checks"]["migrations:version"][0];
    assert_eq!(check["appliedThisStart"], 0, "no migration ran twice: {check}");
    assert_eq!(check["observedValue"], 1);
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

    println!(
        "e2e figures: build {build_secs:.0} s, qcow2 {size_mb:.0} MB, boot-to-ready (TCG) SeaBIOS {bios_ready:.1} s, \
         OVMF {uefi_ready:.1} s, second boot {second_ready:.1} s, power-off {:.1} s",
        powerdown.as_secs_f64()
    );
}
