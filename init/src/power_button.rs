//! `foobar-power-button`: the ACPI power button (a cloud's "stop") from early boot until logind has it. A program of
//! its own, with nothing but the C library: it must be running within a second of systemd starting, under emulation
//! and beside everything else that starts then (foobar-agent took seconds just to load).
//!
//! logind handles the button only once udev has tagged its input device `power-switch`, which under emulation
//! happens late in first boot; a press before that reaches no reader and is lost. This watches the button's event
//! device itself from the first seconds of boot (the kernel makes `/dev/input/eventN` at once), powers off on a press
//! (`poweroff.target` started the way logind starts it: a clean shutdown), and exits once logind is running and the device
//! carries the tag, so logind's settings (`HandlePowerKey=`, inhibitors) rule from then on.

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

/// What the kernel calls the ACPI power button's input device.
const NAME: &str = "Power Button";
/// `struct input_event` on 64-bit Linux: a timeval (16 bytes), type (u16), code (u16), value (i32).
const EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// How the watch ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The button was pressed; the machine is powering off.
    Pressed,
    /// logind has the button now.
    HandedOver,
}

/// Where to look; tests point these elsewhere.
#[derive(Debug, Clone)]
struct Paths {
    /// `/sys/class/input`: each `eventN/device/name` and `eventN/dev` (`MAJOR:MINOR`).
    sys_input: PathBuf,
    /// `/dev/input`.
    dev_input: PathBuf,
    /// `/run/udev/data`: udev's record of each device (`c13:65`), with its tags (`G:power-switch`).
    udev_data: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            sys_input: PathBuf::from("/sys/class/input"),
            dev_input: PathBuf::from("/dev/input"),
            udev_data: PathBuf::from("/run/udev/data"),
        }
    }
}

/// The power button's event devices (`eventN` names) present now.
fn buttons(paths: &Paths) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(&paths.sys_input)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("event"))
        .filter(|n| {
            std::fs::read_to_string(paths.sys_input.join(n).join("device/name")).is_ok_and(|name| name.trim() == NAME)
        })
        .collect();
    found.sort();
    found
}

/// Whether udev has tagged the device for logind.
fn tagged(paths: &Paths, event: &str) -> bool {
    let Ok(dev) = std::fs::read_to_string(paths.sys_input.join(event).join("dev")) else {
        return false;
    };
    std::fs::read_to_string(paths.udev_data.join(format!("c{}", dev.trim())))
        .is_ok_and(|data| data.lines().any(|l| l == "G:power-switch" || l == "Q:power-switch"))
}

/// Whether a read of events holds a press of the power key.
fn pressed(events: &[u8]) -> bool {
    events.chunks_exact(EVENT_SIZE).any(|e| {
        let kind = u16::from_ne_bytes([e[16], e[17]]);
        let code = u16::from_ne_bytes([e[18], e[19]]);
        let value = i32::from_ne_bytes([e[20], e[21], e[22], e[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

/// Watches until a press (then `power_off` runs) or until `logind_running` says logind is up and every button is
/// tagged for it. Blocking.
fn watch(paths: &Paths, logind_running: impl Fn() -> bool, power_off: impl Fn()) -> std::io::Result<Outcome> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut open: Vec<(String, std::fs::File)> = Vec::new();
    let mut last_check = std::time::Instant::now();
    loop {
        for event in buttons(paths) {
            if !open.iter().any(|(name, _)| *name == event) {
                let path = paths.dev_input.join(&event);
                // sysfs shows the device a moment before devtmpfs has its node: then it is opened next round.
                let file = match std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path)
                {
                    Ok(file) => file,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("cannot open {}: {e}", path.display()),
                        ))
                    }
                };
                println!("foobar-power-button: watching {} until logind has it", path.display());
                open.push((event, file));
            }
        }
        let mut buf = [0u8; EVENT_SIZE * 32];
        for (_, file) in &mut open {
            loop {
                match file.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        if pressed(&buf[..n]) {
                            println!("foobar-power-button: pressed before logind watches it: powering off");
                            power_off();
                            return Ok(Outcome::Pressed);
                        }
                    }
                    _ => break,
                }
            }
        }
        // At most every second: has logind taken over?
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = std::time::Instant::now();
            if !open.is_empty() && open.iter().all(|(e, _)| tagged(paths, e)) && logind_running() {
                println!("foobar-power-button: logind handles the power button now");
                return Ok(Outcome::HandedOver);
            }
        }
        // Asleep until an event arrives (or a second passes); until the button is there, looked for five times a
        // second. Nothing costs CPU while boot needs it.
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|(_, f)| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(f),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let timeout = if open.is_empty() { 200 } else { 1000 };
        // SAFETY: a valid array of pollfd of the given length, alive for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
    }
}

/// Asks systemd (PID 1) to power off: SIGRTMIN+4 starts `poweroff.target` with `--job-mode=replace-irreversibly`
/// (systemd(1)), what logind asks for on the button. A signal needs no socket, no D-Bus and no other process: early
/// in boot, `systemctl --no-block start poweroff.target` did not return (in CI and here, while first boot ran) and the
/// machine ran on.
fn signal_systemd() -> Result<(), String> {
    // SAFETY: kill(2) has no memory effects; PID 1 is systemd, and root may signal it.
    if unsafe { libc::kill(1, libc::SIGRTMIN() + 4) } == 0 {
        Ok(())
    } else {
        Err(format!("cannot signal systemd: {}", std::io::Error::last_os_error()))
    }
}

/// A command line, split at spaces, run to its exit status.
#[allow(clippy::disallowed_methods)] // systemctl, its status read
fn run(command: &str) -> bool {
    let mut words = command.split_whitespace();
    let Some(program) = words.next() else {
        return false;
    };
    std::process::Command::new(program)
        .args(words)
        .status()
        .is_ok_and(|s| s.success())
}

/// Flags: `--root DIR` (devices under DIR: tests), `--logind CMD` (exits 0 once logind runs), `--power-off CMD`
/// (instead of signalling systemd: tests).
fn main() {
    let mut paths = Paths::default();
    let mut logind = "systemctl is-active --quiet systemd-logind.service".to_string();
    // What logind does on the button, asked of systemd with a signal (see `power_off`); tests give a command instead.
    let mut power_off: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| {
            eprintln!("foobar-power-button: {flag} needs a value");
            std::process::exit(2)
        });
        match flag.as_str() {
            "--root" => {
                let root = PathBuf::from(value);
                paths = Paths {
                    sys_input: root.join("sys/class/input"),
                    dev_input: root.join("dev/input"),
                    udev_data: root.join("run/udev/data"),
                };
            }
            "--logind" => logind = value,
            "--power-off" => power_off = Some(value),
            _ => {
                eprintln!("foobar-power-button: unknown flag {flag}; expected --root, --logind or --power-off");
                std::process::exit(2)
            }
        }
    }
    match watch(
        &paths,
        || run(&logind),
        || {
            let done = match &power_off {
                Some(command) => run(command).then_some(()).ok_or_else(|| format!("`{command}` failed")),
                None => signal_systemd(),
            };
            match done {
                Ok(()) => println!("foobar-power-button: poweroff.target requested"),
                Err(err) => eprintln!("foobar-power-button: cannot power off: {err}"),
            }
        },
    ) {
        Ok(_) => {}
        Err(err) => {
            eprintln!("foobar-power-button: {err}");
            std::process::exit(1)
        }
    }
}
