//! The two systemd protocols the agent speaks: socket activation (`LISTEN_FDS`) and `sd_notify`.

use std::os::fd::{FromRawFd as _, IntoRawFd as _};
use std::os::unix::net::UnixDatagram;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// A listening socket inherited from systemd.
pub enum Inherited {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Takes the socket systemd passed us, if it passed one to this process.
pub fn take_listener() -> Option<Inherited> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    // The variables are meant for us alone; children must not think they own the socket.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: systemd guarantees that descriptor 3 is an open listening socket owned by this process,
    // and nothing else in the process has taken it (the variables were removed above).
    let tcp = unsafe { std::net::TcpListener::from_raw_fd(LISTEN_FDS_START) };
    if tcp.local_addr().is_ok() {
        return Some(Inherited::Tcp(tcp));
    }
    let fd = tcp.into_raw_fd();
    // SAFETY: the same descriptor, released by the TCP wrapper above; it is a unix socket.
    Some(Inherited::Unix(unsafe {
        std::os::unix::net::UnixListener::from_raw_fd(fd)
    }))
}

/// Sends a state line (`READY=1`, `WATCHDOG=1`, `STOPPING=1`) to systemd when it is listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(err) = sent {
        tracing::warn!(%err, state, "cannot notify systemd");
    }
}

/// How often to ping the watchdog, when systemd asked this process for pings.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return None;
        }
    }
    Some(std::time::Duration::from_micros(usec / 2))
}
