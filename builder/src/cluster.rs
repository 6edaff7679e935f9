//! `imagebuild cluster up|status|down`: every node of a cluster description in QEMU, on one private network, on
//! this machine. The network is a bridge in a network namespace of its own (`foobar-NAME`), with the host's end at
//! the network's first address; dnsmasq there gives each node its address by its MAC (the description's address);
//! each node gets a NoCloud seed naming it and carrying the cluster's secrets, made here at random and kept in the
//! state directory (0600), never in the image. Nodes boot one after another (each VM costs CPU under emulation).
//! socat on 127.0.0.1 forwards the site (the floating address, or the first app node) to the host.
//!
//! What runs is recorded in `STATE/state.json`, which `status` and `down` read; `down` stops every process it names
//! and removes the namespace, also after a failed `up`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use foobar_agent::cluster::{Description, Role, GALERA_CHECK_PORT};
use serde::{Deserialize, Serialize};

use crate::boot::BootPlan;
use crate::process::cmd;

pub const DEFAULT_STATE: &str = "/run/foobar-cluster";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub namespace: String,
    /// Where the site answers on the host: `127.0.0.1:PORT` (HTTP) and the next port (HTTPS).
    pub site: String,
    pub site_https: String,
    /// What the site's address forwards to inside the namespace.
    pub target: String,
    pub nodes: Vec<NodeState>,
    /// dnsmasq's and the forwarders' pids.
    pub helpers: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub roles: Vec<String>,
    pub address: Ipv4Addr,
    pub mac: String,
    pub tap: String,
    pub pid: u32,
    pub monitor: PathBuf,
    pub serial: PathBuf,
    pub memory_mib: u32,
    /// The image its disk is an overlay of (`up`'s, or a rollout's).
    #[serde(default)]
    pub image: PathBuf,
    /// Db nodes: the data disk that holds MariaDB's data directory; it outlives the node's root disk (a rollout
    /// replaces that and keeps this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_disk: Option<PathBuf>,
}

/// The size of a db node's data disk (qcow2: it takes only what is written).
pub const DATA_DISK_MIB: u64 = 4096;

pub struct Up {
    pub description: PathBuf,
    pub image: PathBuf,
    pub state: PathBuf,
    pub port: u16,
    pub memory_mib: u32,
    /// Seconds each node may take to finish its first boot.
    pub node_timeout: u64,
    /// Nodes made ready (disk, seed, network) but not booted: `cluster start NODE` adds them later.
    pub hold: Vec<String>,
}

fn namespace(name: &str) -> String {
    format!("foobar-{name}")
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

pub fn load_state(dir: &Path) -> anyhow::Result<State> {
    let file = state_file(dir);
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("no cluster is up here ({} cannot be read)", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a cluster state file", file.display()))
}

fn save_state(dir: &Path, state: &State) -> anyhow::Result<()> {
    let file = state_file(dir);
    let tmp = dir.join("state.json.new");
    std::fs::write(&tmp, serde_json::to_string_pretty(state)?)?;
    std::fs::rename(&tmp, &file).with_context(|| format!("cannot write {}", file.display()))
}

fn random_secret(len: usize) -> anyhow::Result<String> {
    use std::io::Read as _;
    const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| CHARS[*b as usize % CHARS.len()] as char).collect())
}

/// The host's end of the bridge: the network's first address.
fn gateway(description: &Description) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(description.network().base) + 1)
}

fn in_namespace(ns: &str, program: &str) -> crate::process::Cmd {
    cmd("ip").args(["netns", "exec", ns, program])
}

/// A `cidata` volume with the node's name and the cluster's secrets.
fn seed(dir: &Path, node: &str, secrets: &str) -> anyhow::Result<PathBuf> {
    let files = dir.join(format!("{node}.seed"));
    std::fs::create_dir_all(&files)?;
    std::fs::write(
        files.join("meta-data"),
        format!("instance-id: {node}\nlocal-hostname: {node}\n"),
    )?;
    std::fs::write(
        files.join("user-data"),
        format!("#foobar-config\n[node]\nname = \"{node}\"\n\n{secrets}"),
    )?;
    let image = dir.join(format!("{node}.seed.img"));
    let _ = std::fs::remove_file(&image);
    cmd("mkfs.fat")
        .args(["-C", "-n", "CIDATA"])
        .arg(&image)
        .arg("1024")
        .run()?;
    cmd("mcopy")
        .arg("-i")
        .arg(&image)
        .arg(files.join("meta-data"))
        .arg(files.join("user-data"))
        .arg("::")
        .run()?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o600))?;
    Ok(image)
}

pub fn up(plan: &Up) -> anyhow::Result<State> {
    let description = Description::load(&plan.description)?;
    if !plan.image.is_file() {
        bail!(
            "--image {}: no such image; build one with `imagebuild --config ... --out`",
            plan.image.display()
        );
    }
    let gw = gateway(&description);
    if description.nodes.iter().any(|n| n.address == gw) || description.floating_address == Some(gw) {
        bail!(
            "{}: {gw} is the host's end of the local network (the network's first address): give the nodes others",
            plan.description.display()
        );
    }
    std::fs::create_dir_all(&plan.state).with_context(|| format!("cannot create {}", plan.state.display()))?;
    for name in &plan.hold {
        if description.node(name).is_none() {
            bail!("--hold {name}: no such node in {}", plan.description.display());
        }
    }
    if state_file(&plan.state).exists() {
        bail!(
            "a cluster is already up ({}): stop it first with `imagebuild cluster down --state {}`",
            state_file(&plan.state).display(),
            plan.state.display()
        );
    }
    let ns = namespace(&description.name);
    let target = match description.floating_address {
        Some(floating) => floating,
        None => description
            .with_role(Role::App)
            .next()
            .map(|n| n.address)
            .context("a cluster without lb or app nodes has no site to show")?,
    };
    let mut state = State {
        name: description.name.clone(),
        namespace: ns.clone(),
        site: format!("127.0.0.1:{}", plan.port),
        site_https: format!("127.0.0.1:{}", plan.port + 1),
        target: target.to_string(),
        nodes: Vec::new(),
        helpers: Vec::new(),
    };
    save_state(&plan.state, &state)?;

    let network = description.network();
    let _ = cmd("ip").args(["netns", "del", &ns]).run();
    cmd("ip").args(["netns", "add", &ns]).run()?;
    let ip = |args: &[&str]| in_namespace(&ns, "ip").args(args).run();
    ip(&["link", "set", "lo", "up"])?;
    ip(&["link", "add", "br0", "type", "bridge"])?;
    ip(&["addr", "add", &format!("{gw}/{}", network.prefix), "dev", "br0"])?;
    ip(&["link", "set", "br0", "up"])?;

    let secrets = format!(
        "[secrets]\ndatabase-password = \"{}\"\nvrrp-password = \"{}\"\n",
        random_secret(24)?,
        random_secret(8)?
    );
    let mut dnsmasq = in_namespace(&ns, "dnsmasq").args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--interface=br0",
        "--bind-interfaces",
        "--dhcp-authoritative",
        "--log-facility=-",
    ]);
    // Leases of this cluster only: another cluster's (a MAC that held another address) would refuse an address.
    let leases = plan.state.join("dnsmasq.leases");
    let _ = std::fs::remove_file(&leases);
    dnsmasq = dnsmasq.arg(format!("--dhcp-leasefile={}", leases.display()));
    dnsmasq = dnsmasq.arg(format!(
        "--dhcp-range={},static,{}",
        network.base,
        Ipv4Addr::from(u32::MAX << (32 - network.prefix))
    ));
    let macs: Vec<String> = (0..description.nodes.len())
        .map(|i| format!("52:54:00:88:{:02x}:{:02x}", i / 256, i % 256 + 10))
        .collect();
    for (node, mac) in description.nodes.iter().zip(&macs) {
        dnsmasq = dnsmasq.arg(format!("--dhcp-host={mac},{},{}", node.address, node.name));
    }
    state
        .helpers
        .push(dnsmasq.spawn_detached(&plan.state.join("dnsmasq.log"))?);
    for (port, guest) in [(plan.port, 80), (plan.port + 1, 443)] {
        let forward = cmd("socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg(format!("EXEC:ip netns exec {ns} socat STDIO TCP\\:{target}\\:{guest}"));
        state
            .helpers
            .push(forward.spawn_detached(&plan.state.join("socat.log"))?);
    }
    save_state(&plan.state, &state)?;

    for (i, node) in description.nodes.iter().enumerate() {
        let started = Instant::now();
        let tap = format!("tap{i}");
        ip(&["tuntap", "add", &tap, "mode", "tap"])?;
        ip(&["link", "set", &tap, "master", "br0", "up"])?;
        let image = std::fs::canonicalize(&plan.image)?;
        overlay(&image, &plan.state.join(format!("{}.qcow2", node.name)))?;
        seed(&plan.state, &node.name, &secrets)?;
        // A db node's database lives on a data disk of its own, new with the cluster (one left by an earlier cluster
        // in this directory holds another cluster's database).
        let data_disk = node
            .roles
            .contains(&Role::Db)
            .then(|| plan.state.join(format!("{}.data.qcow2", node.name)));
        if let Some(disk) = &data_disk {
            let _ = std::fs::remove_file(disk);
            crate::boot::make_data_disk(disk, DATA_DISK_MIB)?;
        }
        let mut node_state = NodeState {
            name: node.name.clone(),
            roles: node.roles.iter().map(|r| r.name().to_string()).collect(),
            address: node.address,
            mac: macs[i].clone(),
            tap,
            pid: 0,
            monitor: plan.state.join(format!("{}.monitor", node.name)),
            serial: plan.state.join(format!("{}.serial.log", node.name)),
            memory_mib: plan.memory_mib,
            image,
            data_disk,
        };
        if plan.hold.contains(&node.name) {
            println!(
                "{}: held (start it with `imagebuild cluster start {}`)",
                node.name, node.name
            );
            state.nodes.push(node_state);
            save_state(&plan.state, &state)?;
            continue;
        }
        let serial = node_state.serial.clone();
        let pid = start_node(&plan.state, &ns, &node_state)?;
        node_state.pid = pid;
        state.nodes.push(node_state);
        save_state(&plan.state, &state)?;
        println!(
            "{}: booting ({}; {})",
            node.name,
            node.roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "),
            node.address
        );
        wait_first_boot(&serial, pid, Duration::from_secs(plan.node_timeout))
            .with_context(|| format!("node {} (its console: {})", node.name, serial.display()))?;
        println!(
            "{}: first boot done in {:.1} s",
            node.name,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(state)
}

/// A node's own disk: a copy-on-write overlay of the image, kept across its restarts (`cluster start`).
fn overlay(image: &Path, disk: &Path) -> anyhow::Result<()> {
    cmd("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            crate::boot::image_format(image),
            "-b",
        ])
        .arg(image)
        .arg(disk)
        .run()
}

/// Boots a node from its own disk in the state directory; its QEMU's pid.
fn start_node(dir: &Path, ns: &str, node: &NodeState) -> anyhow::Result<u32> {
    let _ = std::fs::remove_file(&node.serial);
    let boot = BootPlan {
        image: dir.join(format!("{}.qcow2", node.name)),
        port: 0,
        uefi: false,
        write: true,
        memory_mib: node.memory_mib,
        serial: Some(node.serial.clone()),
        monitor: Some(node.monitor.clone()),
        forwards: Vec::new(),
        platform: None,
        metadata: None,
        seed: Some(dir.join(format!("{}.seed.img", node.name))),
        data_disk: node.data_disk.clone(),
        data_disk_size_mib: DATA_DISK_MIB,
        tap: Some((node.tap.clone(), node.mac.clone())),
    };
    crate::boot::qemu(&boot, Some(ns))?.spawn_detached(&dir.join(format!("{}.qemu.log", node.name)))
}

/// `cluster start NODE`: boots a node that is not running again, from its own disk (what it wrote is kept).
pub fn start(dir: &Path, name: &str) -> anyhow::Result<u32> {
    let mut state = load_state(dir)?;
    let Some(node) = state.nodes.iter_mut().find(|n| n.name == name) else {
        bail!(
            "no node `{name}` in this cluster; its nodes: {}",
            state
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if alive(node.pid) {
        bail!("node `{name}` is running (QEMU pid {})", node.pid);
    }
    node.pid = start_node(dir, &state.namespace, node)?;
    let pid = node.pid;
    save_state(dir, &state)?;
    Ok(pid)
}

/// `cluster stop NODE`: the ACPI power button (a clean shutdown), or with `power_cut` the QEMU process killed.
pub fn stop(dir: &Path, name: &str, power_cut: bool) -> anyhow::Result<()> {
    let state = load_state(dir)?;
    let Some(node) = state.nodes.iter().find(|n| n.name == name) else {
        bail!("no node `{name}` in this cluster");
    };
    if !alive(node.pid) {
        return Ok(());
    }
    // The monitor's connection stays open until QEMU exits: closed right after the command, QEMU may drop it unread.
    let mut _monitor = None;
    if power_cut {
        // SAFETY: kill of a QEMU this cluster started.
        unsafe { libc::kill(node.pid as i32, libc::SIGKILL) };
    } else {
        use std::io::Write as _;
        let mut monitor = std::os::unix::net::UnixStream::connect(&node.monitor)
            .with_context(|| format!("{}: cannot reach QEMU's monitor", node.monitor.display()))?;
        monitor.write_all(b"system_powerdown\n")?;
        _monitor = Some(monitor);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive(node.pid) {
        if Instant::now() > deadline {
            bail!("node `{name}` still runs 60 s after its power button");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Waits for first boot's last line on the node's console.
fn wait_first_boot(serial: &Path, pid: u32, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains("foobar-firstboot: done") {
            return Ok(());
        }
        if !alive(pid) {
            bail!("QEMU exited before first boot was done");
        }
        if Instant::now() > deadline {
            bail!("first boot not done within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether the process runs: it exists and is not a zombie (a killed QEMU whose parent has not reaped it yet).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// `cluster rollout`: the app nodes (or the db nodes) moved to a new image one at a time, without a failed request.
pub struct Rollout {
    pub state: PathBuf,
    pub image: PathBuf,
    /// Which nodes: `app` (through a free slot) or `db` (in place, each on its own data disk).
    pub role: Role,
    /// Seconds each new node may take from its start until it is ready and passes the read-only smoke checks.
    pub node_timeout: u64,
    /// The site's canonical name, sent as Host with the health requests and the smoke checks.
    pub host: String,
}

/// What a rollout did: the nodes that now run the new image, and the free slots that hold it unbooted.
#[derive(Debug, Default)]
pub struct RolledOut {
    pub replaced: Vec<String>,
    pub spare: Vec<String>,
}

/// Replaces every running app node that runs another image, one at a time: a free app slot (a node of the
/// description that is not running) boots from the new image; once it is ready and passes the read-only smoke checks,
/// and the load balancers' checks have had time to put it into rotation, one old node is stopped by its power button
/// (it drains: `/readyz` 503 while it serves on, then stops) and its slot is the next one's. A new node that is not
/// ready within the limit is removed (its slot's disk is put back) and the rollout stops with an error; the old nodes
/// were not touched and keep serving. At the end the free slots hold the new image, unbooted.
pub fn rollout(plan: &Rollout, mut say: impl FnMut(&str)) -> anyhow::Result<RolledOut> {
    if !plan.image.is_file() {
        bail!(
            "--image {}: no such image; build one with `imagebuild --config ... --out` (the same cluster description)",
            plan.image.display()
        );
    }
    let image = std::fs::canonicalize(&plan.image)?;
    let mut state = load_state(&plan.state)?;
    match plan.role {
        Role::App => {}
        Role::Db => return rollout_db(plan, &image, state, say),
        other => bail!(
            "--role {}: a rollout replaces app nodes (through a free slot) or db nodes (in place); replace lb nodes \
             one at a time with `cluster stop` and `cluster start` (see the README)",
            other.name()
        ),
    }
    let app_only = |n: &NodeState| n.roles.iter().all(|r| r == "app") && !n.roles.is_empty();
    if let Some(node) = state
        .nodes
        .iter()
        .find(|n| n.roles.iter().any(|r| r == "app") && !app_only(n))
    {
        bail!(
            "node `{}` is {}: `cluster rollout` replaces nodes whose only role is app (the others hold the floating \
             address or a database: replace those one at a time with `cluster stop` and `cluster start`, see the README)",
            node.name,
            node.roles.join("+")
        );
    }
    let mut old: Vec<String> = state
        .nodes
        .iter()
        .filter(|n| app_only(n) && alive(n.pid) && n.image != image)
        .map(|n| n.name.clone())
        .collect();
    let mut free: Vec<String> = state
        .nodes
        .iter()
        .filter(|n| app_only(n) && !alive(n.pid))
        .map(|n| n.name.clone())
        .collect();
    if old.is_empty() {
        say(&format!("every running app node runs {} already", image.display()));
        return Ok(RolledOut::default());
    }
    if free.is_empty() {
        bail!(
            "every app node runs ({}): a rollout boots each new node in a free app slot before it stops an old one; \
             describe one more app node and hold it (`cluster up --hold NAME`), or stop one (`cluster stop {}`)",
            old.join(", "),
            old[old.len() - 1]
        );
    }
    let has_lb = state.nodes.iter().any(|n| n.roles.iter().any(|r| r == "lb"));
    let mut done = RolledOut::default();
    while !old.is_empty() {
        let slot = free.remove(0);
        let leaving = old.remove(0);
        let started = Instant::now();
        say(&format!("{slot}: booting {}", image.display()));
        let index = state
            .nodes
            .iter()
            .position(|n| n.name == slot)
            .expect("a node of the state");
        let disk = plan.state.join(format!("{slot}.qcow2"));
        let kept = plan.state.join(format!("{slot}.qcow2.before-rollout"));
        std::fs::rename(&disk, &kept).with_context(|| format!("cannot move {} aside", disk.display()))?;
        let previous = state.nodes[index].clone();
        let booted = overlay(&image, &disk).and_then(|()| start_node(&plan.state, &state.namespace, &previous));
        let pid = match booted {
            Ok(pid) => pid,
            Err(e) => {
                let _ = std::fs::rename(&kept, &disk);
                return Err(e.context(format!("{slot}: cannot boot the new image")));
            }
        };
        state.nodes[index].pid = pid;
        state.nodes[index].image = image.clone();
        save_state(&plan.state, &state)?;

        let deadline = started + Duration::from_secs(plan.node_timeout);
        if let Err(why) = wait_ready_and_smoke(&state, &state.nodes[index], &plan.host, deadline) {
            // The new node goes; its slot is as it was; nothing else was touched.
            kill_and_wait(pid);
            let _ = std::fs::remove_file(&disk);
            std::fs::rename(&kept, &disk).with_context(|| format!("cannot put {} back", disk.display()))?;
            state.nodes[index] = NodeState { pid: 0, ..previous };
            save_state(&plan.state, &state)?;
            let serving: Vec<&str> = state
                .nodes
                .iter()
                .filter(|n| app_only(n) && alive(n.pid))
                .map(|n| n.name.as_str())
                .collect();
            bail!(
                "rollout stopped: {slot} on {} {why}; it was removed and {slot}'s disk put back as it was; {} keep \
                 serving (nodes replaced before it: {}); its console: {}",
                image.display(),
                serving.join(", "),
                listed(&done.replaced),
                state.nodes[index].serial.display()
            );
        }
        let _ = std::fs::remove_file(&kept);
        say(&format!(
            "{slot}: ready and smoke-checked {:.1} s after its start",
            started.elapsed().as_secs_f64()
        ));
        if has_lb {
            let wait = (foobar_agent::cluster::APP_CHECK_RISE + 1) * foobar_agent::cluster::APP_CHECK_INTERVAL_SECS;
            say(&format!(
                "{slot}: {wait} s for the load balancers' checks to send it requests"
            ));
            std::thread::sleep(Duration::from_secs(wait));
        }
        say(&format!("{leaving}: draining and stopping (power button)"));
        let stopping = Instant::now();
        stop(&plan.state, &leaving, false)?;
        say(&format!(
            "{leaving}: off after {:.1} s",
            stopping.elapsed().as_secs_f64()
        ));
        done.replaced.push(slot);
        free.push(leaving);
    }
    // The free slots hold the new image too, so that `cluster start` boots it.
    for slot in free {
        let index = state
            .nodes
            .iter()
            .position(|n| n.name == slot)
            .expect("a node of the state");
        if state.nodes[index].image != image {
            let disk = plan.state.join(format!("{slot}.qcow2"));
            std::fs::remove_file(&disk).with_context(|| format!("cannot remove {}", disk.display()))?;
            overlay(&image, &disk)?;
            state.nodes[index].image = image.clone();
            save_state(&plan.state, &state)?;
        }
        done.spare.push(slot);
    }
    Ok(done)
}

/// Replaces every db node that runs another image, in place, one at a time, only while every db node is Synced: the
/// node's power button (its Galera check drains first, so the app nodes' proxies move to another node before MariaDB
/// stops), a new root disk from the new image, the same data disk, then the wait until its check says Synced again
/// (Galera brings it up to date: an incremental transfer of what it missed). A node that is not Synced within the
/// limit is removed, its old root disk is put back and booted again (it rejoins from its data disk), and the
/// rollout stops with an error.
fn rollout_db(plan: &Rollout, image: &Path, mut state: State, mut say: impl FnMut(&str)) -> anyhow::Result<RolledOut> {
    let is_db = |n: &NodeState| n.roles.iter().any(|r| r == "db");
    if let Some(node) = state.nodes.iter().find(|n| is_db(n) && n.roles.len() > 1) {
        bail!(
            "node `{}` is {}: `cluster rollout --role db` replaces nodes whose only role is db (see the README for \
             the combined layout)",
            node.name,
            node.roles.join("+")
        );
    }
    let check =
        |ns: &str, node: &NodeState| get_in(ns, &format!("http://{}:{GALERA_CHECK_PORT}/", node.address), "galera");
    let whole = |state: &State| -> Result<(), String> {
        for node in state.nodes.iter().filter(|n| is_db(n)) {
            if !alive(node.pid) {
                return Err(format!("db node `{}` is not running", node.name));
            }
            let (code, body) = check(&state.namespace, node);
            if code != 200 {
                return Err(format!(
                    "db node `{}` is not Synced (its check answered {})",
                    node.name,
                    answer(code, &body)
                ));
            }
        }
        Ok(())
    };
    let old: Vec<String> = state
        .nodes
        .iter()
        .filter(|n| is_db(n) && n.image != image)
        .map(|n| n.name.clone())
        .collect();
    if old.is_empty() {
        say(&format!("every db node runs {} already", image.display()));
        return Ok(RolledOut::default());
    }
    if let Some(node) = state.nodes.iter().find(|n| is_db(n) && n.data_disk.is_none()) {
        bail!(
            "db node `{}` has no data disk (a cluster brought up by an older imagebuild): its database would not \
             outlive its root disk; bring the cluster up again",
            node.name
        );
    }
    let mut done = RolledOut::default();
    for name in old {
        whole(&state).map_err(|why| {
            anyhow::anyhow!(
                "{why}: a rollout takes one db node out at a time, and only while every db node is Synced (nodes \
                 replaced before: {}); start it (`cluster start NODE`) and wait until `cluster status` shows it \
                 synced",
                listed(&done.replaced)
            )
        })?;
        let index = state
            .nodes
            .iter()
            .position(|n| n.name == name)
            .expect("a node of the state");
        say(&format!("{name}: draining and stopping (power button)"));
        let stopping = Instant::now();
        stop(&plan.state, &name, false)?;
        say(&format!("{name}: off after {:.1} s", stopping.elapsed().as_secs_f64()));
        let disk = plan.state.join(format!("{name}.qcow2"));
        let kept = plan.state.join(format!("{name}.qcow2.before-rollout"));
        std::fs::rename(&disk, &kept).with_context(|| format!("cannot move {} aside", disk.display()))?;
        let previous = state.nodes[index].clone();
        let started = Instant::now();
        say(&format!("{name}: booting {} on its data disk", image.display()));
        let booted = overlay(image, &disk).and_then(|()| start_node(&plan.state, &state.namespace, &previous));
        let failure = match booted {
            Ok(pid) => {
                state.nodes[index].pid = pid;
                state.nodes[index].image = image.to_path_buf();
                save_state(&plan.state, &state)?;
                let deadline = started + Duration::from_secs(plan.node_timeout);
                loop {
                    if !alive(pid) {
                        break Some("stopped before it was Synced (its QEMU exited)".to_string());
                    }
                    let (code, body) = check(&state.namespace, &state.nodes[index]);
                    if code == 200 {
                        break None;
                    }
                    if Instant::now() > deadline {
                        break Some(format!(
                            "was not Synced within the limit (its Galera check answered {})",
                            answer(code, &body)
                        ));
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            Err(e) => Some(format!("could not boot: {e:#}")),
        };
        if let Some(why) = failure {
            // The new root goes; the old one comes back on the same data disk and rejoins.
            let pid = state.nodes[index].pid;
            if pid != previous.pid {
                kill_and_wait(pid);
            }
            let _ = std::fs::remove_file(&disk);
            std::fs::rename(&kept, &disk).with_context(|| format!("cannot put {} back", disk.display()))?;
            state.nodes[index] = previous.clone();
            let again = start_node(&plan.state, &state.namespace, &previous);
            state.nodes[index].pid = *again.as_ref().unwrap_or(&0);
            save_state(&plan.state, &state)?;
            bail!(
                "rollout stopped: {name} on {} {why}; it was removed and {name}'s old disk put back and {} (it \
                 rejoins from its data disk: see `cluster status`); db nodes replaced before it: {}; its console: {}",
                image.display(),
                match again {
                    Ok(_) => "booted again".to_string(),
                    Err(e) => format!("could not boot it again ({e:#}): `cluster start {name}`"),
                },
                listed(&done.replaced),
                previous.serial.display()
            );
        }
        let _ = std::fs::remove_file(&kept);
        say(&format!(
            "{name}: Synced {:.1} s after its start",
            started.elapsed().as_secs_f64()
        ));
        // The app nodes' proxies take it back after two good checks a second apart.
        std::thread::sleep(Duration::from_secs(3));
        done.replaced.push(name);
    }
    Ok(done)
}

/// A status code and its body as a message shows them: `503: not synced ...`, or the code alone.
fn answer(code: u16, body: &str) -> String {
    match body.trim() {
        "" => code.to_string(),
        text => format!("{code}: {text}"),
    }
}

/// Node names for a message, or `none`.
fn listed(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// Kills a QEMU a rollout started and waits until it is gone (nothing if it already is).
fn kill_and_wait(pid: u32) {
    if alive(pid) {
        // SAFETY: kill of a QEMU this rollout started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    while alive(pid) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the node's `/readyz` answers 200 (asked on its own address), then runs the read-only smoke checks
/// against it; the reason when either does not happen before the deadline.
fn wait_ready_and_smoke(state: &State, node: &NodeState, host: &str, deadline: Instant) -> Result<(), String> {
    let url = format!("http://{}/readyz", node.address);
    loop {
        if !alive(node.pid) {
            return Err("stopped before it was ready (its QEMU exited)".to_string());
        }
        let last = get_in(&state.namespace, &url, host);
        if last.0 == 200 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "was not ready within the limit (its /readyz answered {})",
                answer(last.0, &last.1)
            ));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find imagebuild itself for the smoke checks: {e}"))?;
    let out = in_namespace(&state.namespace, &exe.to_string_lossy())
        .args([
            "smoke",
            &format!("http://{}", node.address),
            "--host",
            host,
            "--read-only",
            "--insecure",
            "--format",
            "json",
        ])
        .output_lossy();
    let report: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|_| "failed the read-only smoke checks (they gave no report)".to_string())?;
    let failed: Vec<String> = report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == "fail")
        .map(|c| {
            format!(
                "{}: {}",
                c["name"].as_str().unwrap_or("?"),
                c["detail"].as_str().unwrap_or("")
            )
        })
        .collect();
    if report["passed"].as_u64().unwrap_or(0) == 0 || !failed.is_empty() {
        return Err(format!("failed the read-only smoke checks ({})", failed.join("; ")));
    }
    Ok(())
}

/// One node as `status` shows it.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub roles: Vec<String>,
    pub address: Ipv4Addr,
    pub mac: String,
    pub pid: u32,
    pub monitor: PathBuf,
    pub running: bool,
    /// App nodes: `/readyz`'s status code (0: no answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readyz: Option<u16>,
    /// App nodes: the build `/healthz` names (its `version`), when it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Db nodes: what its Galera check says (`synced`, `not synced: ...`, or `no answer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub galera: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub name: String,
    pub namespace: String,
    pub site: String,
    pub site_https: String,
    /// `/readyz` through the site's address inside the namespace (0: no answer).
    pub site_readyz: u16,
    pub nodes: Vec<NodeStatus>,
}

/// An HTTP GET from inside the namespace: the status code and body (code 0 when nothing answered).
pub fn get_in(ns: &str, url: &str, host: &str) -> (u16, String) {
    let out = in_namespace(ns, "curl")
        .args([
            "-s",
            "-m",
            "3",
            "-H",
            &format!("Host: {host}"),
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output_lossy();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

pub fn status(dir: &Path, host: &str) -> anyhow::Result<Status> {
    let state = load_state(dir)?;
    let nodes = state
        .nodes
        .iter()
        .map(|n| {
            let running = alive(n.pid);
            let has = |r: &str| n.roles.iter().any(|x| x == r);
            // A node that is not running is not asked (a request to its address would wait out its whole limit):
            // its /readyz is 0 (no answer) and its Galera state `not running`.
            let get = |url: String| {
                if running {
                    get_in(&state.namespace, &url, host)
                } else {
                    (0, String::new())
                }
            };
            NodeStatus {
                name: n.name.clone(),
                roles: n.roles.clone(),
                address: n.address,
                mac: n.mac.clone(),
                pid: n.pid,
                monitor: n.monitor.clone(),
                running,
                readyz: has("app").then(|| get(format!("http://{}/readyz", n.address)).0),
                version: (has("app") && running)
                    .then(|| get(format!("http://{}/healthz", n.address)).1)
                    .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
                    .and_then(|doc| doc["version"].as_str().map(str::to_string)),
                galera: has("db").then(|| match get(format!("http://{}:{GALERA_CHECK_PORT}/", n.address)) {
                    _ if !running => "not running".to_string(),
                    (0, _) => "no answer".to_string(),
                    (_, body) => body.trim().to_string(),
                }),
            }
        })
        .collect();
    Ok(Status {
        site_readyz: get_in(&state.namespace, &format!("http://{}/readyz", state.target), host).0,
        name: state.name,
        namespace: state.namespace,
        site: state.site,
        site_https: state.site_https,
        nodes,
    })
}

/// Stops every QEMU and helper the state names, removes the namespace and the state. Nothing running is an error
/// only when there is no state at all.
pub fn down(dir: &Path) -> anyhow::Result<usize> {
    let state = load_state(dir)?;
    let mut stopped = 0;
    for pid in state.nodes.iter().map(|n| n.pid).chain(state.helpers.iter().copied()) {
        if alive(pid) {
            // SAFETY: plain kill of a process this cluster started (its own process group).
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
                libc::kill(pid as i32, libc::SIGKILL);
            }
            stopped += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.nodes.iter().any(|n| alive(n.pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = cmd("ip").args(["netns", "del", &state.namespace]).run();
    std::fs::remove_file(state_file(dir)).with_context(|| format!("cannot remove {}", state_file(dir).display()))?;
    Ok(stopped)
}
