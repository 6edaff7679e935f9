//! `imagebuild boot`: the image in QEMU with user networking, host ports N, N+1, N+2 to guest 80, 443, 22.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::process::cmd;

pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

pub struct BootPlan {
    pub image: PathBuf,
    pub port: u16,
    pub uefi: bool,
    /// Write to the image instead of a throwaway overlay.
    pub write: bool,
    pub memory_mib: u32,
    /// Where the serial console goes (default: this terminal).
    pub serial: Option<PathBuf>,
    /// A unix socket for QEMU's human monitor (`system_powerdown`, `quit`).
    pub monitor: Option<PathBuf>,
    /// Extra (host port, guest port) forwards.
    pub forwards: Vec<(u16, u16)>,
    /// SMBIOS strings that make the guest look like this cloud.
    pub platform: Option<Platform>,
    /// A metadata service on the host (`127.0.0.1:PORT`), reached by the guest at `METADATA_ADDRESS`.
    pub metadata: Option<u16>,
    /// A NoCloud seed volume (labelled `cidata`) attached read-only as a second disk.
    pub seed: Option<PathBuf>,
    /// The data disk (serial `foobar-data`), written to; made with `data_disk_size_mib` when it does not exist.
    pub data_disk: Option<PathBuf>,
    pub data_disk_size_mib: u64,
    /// A tap device (and the NIC's MAC) instead of user networking: a cluster node on a bridge (`cluster.rs`).
    pub tap: Option<(String, String)>,
}

/// The serial the image's `data-disk` looks for (besides the ext4 label of the same name).
pub const DATA_DISK_SERIAL: &str = "foobar-data";

/// The clouds whose SMBIOS strings `--platform` imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    Ec2,
    Gce,
    Azure,
}

impl Platform {
    /// QEMU `-smbios` values, as each cloud's hypervisor sets them.
    fn smbios(self) -> &'static [&'static str] {
        match self {
            Platform::Ec2 => &["type=1,manufacturer=Amazon EC2,product=t3.small"],
            Platform::Gce => &["type=1,manufacturer=Google,product=Google Compute Engine"],
            Platform::Azure => &[
                "type=1,manufacturer=Microsoft Corporation,product=Virtual Machine",
                "type=3,asset=7783-7084-3265-9085-8269-3286-77",
            ],
        }
    }
}

/// Where the guest finds the host's metadata service (QEMU forwards only addresses inside its user network).
pub const METADATA_ADDRESS: &str = "10.0.2.100";

/// Parses `HOST:GUEST`, as in `--forward 13306:3306`.
pub fn parse_forward(text: &str) -> Result<(u16, u16), String> {
    let (h, g) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}`: expected HOST_PORT:GUEST_PORT"))?;
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("`{text}`: `{p}` is not a port number"))
    };
    Ok((port(h)?, port(g)?))
}

/// KVM only when it actually runs stock kernels: /dev/kvm opens, a hardware KVM module is loaded, and the host is
/// not a PVM host (`kvm_pvm`), where a stock Debian kernel hangs.
pub fn kvm_usable() -> bool {
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hardware = Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    opens && hardware && !pvm
}

pub fn image_format(image: &Path) -> &'static str {
    match image.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        Some("vmdk") => "vmdk",
        Some("vhd") => "vpc",
        _ => "raw",
    }
}

/// An empty data disk at `path` of `size_mib` (qcow2 or raw by its extension), unless one is there already.
pub(crate) fn make_data_disk(path: &Path, size_mib: u64) -> anyhow::Result<()> {
    if path.exists() {
        if !path.is_file() {
            bail!("--data-disk {}: not a file", path.display());
        }
        return Ok(());
    }
    if !(64..=16 * 1024 * 1024).contains(&size_mib) {
        bail!("--data-disk-size {size_mib}: expected 64 to 16777216 MiB");
    }
    let format = match image_format(path) {
        "qcow2" => "qcow2",
        "raw" => "raw",
        _ => bail!(
            "--data-disk {}: a new data disk is made as .qcow2 or .raw, not {}",
            path.display(),
            image_format(path)
        ),
    };
    println!("making the data disk {} ({size_mib} MiB, {format})", path.display());
    cmd("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(format!("{size_mib}M"))
        .run()
}

pub fn boot(plan: &BootPlan) -> anyhow::Result<()> {
    if !plan.image.is_file() {
        bail!(
            "{}: no such image; build one with `imagebuild --out {}`",
            plan.image.display(),
            plan.image.display()
        );
    }
    if plan.port > u16::MAX - 2 {
        bail!("--port {}: N, N+1 and N+2 must all be valid ports", plan.port);
    }
    if let Some(seed) = &plan.seed {
        if !seed.is_file() {
            bail!(
                "--seed {}: no such file; make one with mkfs.fat -C -n CIDATA and mcopy (see README)",
                seed.display()
            );
        }
    }
    if let Some(disk) = &plan.data_disk {
        make_data_disk(disk, plan.data_disk_size_mib)?;
    }
    if plan.metadata.is_some() && crate::process::find_in_path("socat").is_none() {
        bail!("--metadata needs socat on this machine: apt-get install socat");
    }
    if plan.uefi && !Path::new(OVMF).exists() {
        bail!("--uefi needs {OVMF}: apt-get install ovmf");
    }
    let c = qemu(plan, None)?;
    let (http, https, ssh) = (plan.port, plan.port + 1, plan.port + 2);
    let accel = if kvm_usable() { "kvm" } else { "tcg,thread=multi" };
    println!(
        "booting {} ({}, {})",
        plan.image.display(),
        if plan.uefi { "UEFI" } else { "BIOS" },
        accel
    );
    println!("  http:  http://127.0.0.1:{http}/  (send Host: www.foobar.com)");
    println!("  https: https://127.0.0.1:{https}/");
    println!("  ssh:   ssh -p {ssh} admin@127.0.0.1");
    if let Some(disk) = &plan.data_disk {
        println!("  data:  {} (the data disk, serial {DATA_DISK_SERIAL})", disk.display());
    }
    Err(c.exec())
}

/// QEMU's command line for `plan`; in the network namespace `netns` when given (`ip netns exec`).
pub fn qemu(plan: &BootPlan, netns: Option<&str>) -> anyhow::Result<crate::process::Cmd> {
    let (http, https, ssh) = (plan.port, plan.port + 1, plan.port + 2);
    let accel = if kvm_usable() { "kvm" } else { "tcg,thread=multi" };
    // The root disk boots first (bootindex 0) and is the first virtio disk (vda): devices given with -device are made
    // before those of `-drive if=virtio`, so a data disk made with -device would otherwise come first.
    let mut drive = format!(
        "file={},if=none,id=root,format={},cache=unsafe",
        plan.image.display(),
        image_format(&plan.image)
    );
    if !plan.write {
        drive.push_str(",snapshot=on");
    }
    let mut nic = format!(
        "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{http}-:80,hostfwd=tcp:127.0.0.1:{https}-:443,hostfwd=tcp:127.0.0.1:{ssh}-:22"
    );
    for (host, guest) in &plan.forwards {
        nic.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    if let Some(port) = plan.metadata {
        // Each guest connection to the metadata address runs socat to the host's service.
        nic.push_str(&format!(
            ",guestfwd=tcp:{METADATA_ADDRESS}:80-cmd:socat - TCP:127.0.0.1:{port}"
        ));
    }
    let mut c = match netns {
        Some(ns) => cmd("ip").args(["netns", "exec", ns, "qemu-system-x86_64"]),
        None => cmd("qemu-system-x86_64"),
    };
    c = c
        .args([
            "-accel",
            accel,
            "-m",
            &plan.memory_mib.to_string(),
            "-smp",
            "2",
            "-display",
            "none",
        ])
        .args(["-drive", &drive])
        .args(["-device", "virtio-blk-pci,drive=root,bootindex=0"])
        .args(["-device", "virtio-rng-pci"]);
    c = match &plan.tap {
        Some((ifname, mac)) => c
            .arg("-netdev")
            .arg(format!("tap,id=net0,ifname={ifname},script=no,downscript=no"))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=net0,mac={mac}")),
        None => c.arg("-nic").arg(nic),
    };
    if accel != "kvm" {
        c = c.args(["-cpu", "max"]);
    }
    if plan.uefi {
        c = c.args(["-bios", OVMF]);
    }
    if let Some(platform) = plan.platform {
        for value in platform.smbios() {
            c = c.args(["-smbios", value]);
        }
    }
    if plan.metadata.is_some() {
        // The agent reads this OEM string and sends its metadata requests there instead of 169.254.169.254.
        c = c.args([
            "-smbios",
            &format!("type=11,value=foobar:metadata-url=http://{METADATA_ADDRESS}"),
        ]);
    }
    if let Some(seed) = &plan.seed {
        c = c
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw,readonly=on", seed.display()));
    }
    if let Some(disk) = &plan.data_disk {
        c = c
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=data,format={}",
                disk.display(),
                image_format(disk)
            ))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=data,serial={DATA_DISK_SERIAL}"));
    }
    c = match &plan.serial {
        Some(file) => c.arg("-serial").arg(format!("file:{}", file.display())),
        None => c.args(["-serial", "stdio"]),
    };
    if let Some(sock) = &plan.monitor {
        c = c
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
    }
    Ok(c)
}
