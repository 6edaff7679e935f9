//! GRUB for BIOS and UEFI: the menu (`/boot/grub/grub.cfg`, written into the root file system before the disk is
//! made), then the boot code, installed by writing bytes and files: `boot.img` into the MBR, a core image into the
//! BIOS boot partition, and `EFI/BOOT/BOOTX64.EFI` into an ESP made with mkfs.fat and mtools. No grub-install.

use std::fs::OpenOptions;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::Path;

use anyhow::{ensure, Context as _};

use crate::context::{Context, Layout, SECTOR};
use crate::process::{cmd, Tool};
use crate::util::{copy_at, kernel_version};

/// What this stage runs on the host.
pub const TOOLS: &[Tool] = &[
    Tool {
        program: "mkfs.fat",
        package: "dosfstools",
    },
    Tool {
        program: "mcopy",
        package: "mtools",
    },
    Tool {
        program: "mmd",
        package: "mtools",
    },
    Tool {
        program: "grub-mkimage",
        package: "grub-common",
    },
];

pub const BIOS_MODULES: &str = "/usr/lib/grub/i386-pc";
pub const EFI_MODULES: &str = "/usr/lib/grub/x86_64-efi";
const COMMON: &[&str] = &[
    "part_gpt",
    "ext2",
    "search_fs_uuid",
    "search",
    "configfile",
    "normal",
    "linux",
    "echo",
    "test",
    "serial",
    "terminal",
];

/// The config embedded in both core images: find the root file system by UUID and hand over to its grub.cfg.
fn embedded_config(root_uuid: &str) -> String {
    format!(
        "search --no-floppy --fs-uuid --set=root {root_uuid}\nset prefix=($root)/boot/grub\nconfigfile ($root)/boot/grub/grub.cfg\n"
    )
}

fn mkimage(format: &str, modules_dir: &str, extra: &[&str], config: &Path, out: &Path) -> anyhow::Result<()> {
    cmd("grub-mkimage")
        .args(["-O", format, "-d", modules_dir, "-p", "/boot/grub", "-c"])
        .arg(config)
        .arg("-o")
        .arg(out)
        .args(COMMON)
        .args(extra)
        .run()
}

/// GRUB's files this stage reads, and their packages.
pub fn host_files() -> [(&'static Path, &'static str); 2] {
    [
        (Path::new("/usr/lib/grub/i386-pc/boot.img"), "grub-pc-bin"),
        (Path::new("/usr/lib/grub/x86_64-efi/linux.mod"), "grub-efi-amd64-bin"),
    ]
}

/// The GRUB menu read from the root file system by both the BIOS and the UEFI core images. `cryptomgr.notests`: the
/// kernel skips its crypto algorithms' self-tests, 0.5 s of kernel init and as much again in udev's module loads under
/// emulation (`fips=1` still runs them).
pub fn grub_cfg(root_uuid: &str, kernel: &str) -> String {
    format!(
        "# foobar: written by imagebuild\n\
         set timeout=0\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         menuentry 'foobar' {{\n\
         \tsearch --no-floppy --fs-uuid --set=root {root_uuid}\n\
         \tlinux /boot/vmlinuz-{kernel} root=UUID={root_uuid} rw console=tty0 console=ttyS0,115200n8 quiet cryptomgr.notests\n\
         \tinitrd /boot/initrd.img-{kernel}\n\
         }}\n"
    )
}

/// Writes `/boot/grub/grub.cfg` for the root file system's kernel.
pub fn write_grub_config(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    let kernel = kernel_version(root)?;
    let path = root.join("boot/grub/grub.cfg");
    std::fs::create_dir_all(root.join("boot/grub"))?;
    std::fs::write(&path, grub_cfg(&ctx.ids.root_fs_uuid, &kernel))
        .with_context(|| format!("cannot write {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

pub fn install_bootloader(ctx: &Context, raw: &Path) -> anyhow::Result<()> {
    let layout = &ctx.layout;
    let config = ctx.work.join("grub-embed.cfg");
    std::fs::write(&config, embedded_config(&ctx.ids.root_fs_uuid))?;
    let mut disk = OpenOptions::new().write(true).open(raw)?;

    // BIOS: boot.img's code (not the partition table) into sector 0, pointing at the core image.
    let core = ctx.work.join("core.img");
    mkimage("i386-pc", BIOS_MODULES, &["biosdisk"], &config, &core)?;
    let mut core_bytes = std::fs::read(&core)?;
    ensure!(
        core_bytes.len() as u64 <= Layout::bytes(layout.bios),
        "GRUB core image ({} bytes) does not fit the BIOS boot partition",
        core_bytes.len()
    );
    let start = layout.bios.0;
    // diskboot.img (the core's first sector) loads the rest starting at the next sector.
    core_bytes[0x1F4..0x1FC].copy_from_slice(&(start + 1).to_le_bytes());
    disk.seek(SeekFrom::Start(start * SECTOR))?;
    disk.write_all(&core_bytes)?;
    let boot = std::fs::read(Path::new(BIOS_MODULES).join("boot.img")).context("cannot read GRUB's boot.img")?;
    let mut mbr_code = boot[..440].to_vec();
    mbr_code[0x5C..0x64].copy_from_slice(&start.to_le_bytes());
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&mbr_code)?;

    // UEFI: the removable-media path, found by any firmware without boot entries.
    let efi = ctx.work.join("BOOTX64.EFI");
    mkimage("x86_64-efi", EFI_MODULES, &["fat", "efi_gop"], &config, &efi)?;
    let esp = ctx.work.join("esp.fat");
    let _ = std::fs::remove_file(&esp);
    cmd("mkfs.fat")
        .args(["-C", "-n", "ESP", "-i", &ctx.ids.esp_volume_id, "--invariant"])
        .arg(&esp)
        .arg((Layout::bytes(layout.esp) / 1024).to_string())
        .run()?;
    let epoch = ctx.source_date_epoch.to_string();
    cmd("mmd")
        .args(["-i"])
        .arg(&esp)
        .args(["::/EFI", "::/EFI/BOOT"])
        .env("SOURCE_DATE_EPOCH", &epoch)
        .run()?;
    cmd("mcopy")
        .args(["-i"])
        .arg(&esp)
        .arg(&efi)
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .env("SOURCE_DATE_EPOCH", &epoch)
        .run()?;
    copy_at(&mut disk, &esp, layout.esp.0 * SECTOR, Layout::bytes(layout.esp))?;
    disk.sync_all()?;
    Ok(())
}
