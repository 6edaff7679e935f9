//! The disk: a GPT (written here, byte by byte) with a BIOS boot partition, an EFI system partition and the root
//! partition, the root file system made as a file with `mkfs.ext4 -d` and copied in at its offset. No loop device,
//! no mount.

use std::fs::{File, OpenOptions};
use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::Path;

use anyhow::Context as _;

use crate::context::{Context, Layout, SECTOR};
use crate::process::{cmd, Tool};
use crate::util::copy_at;

/// What this stage runs on the host (and `normalize::fix_inode_times`, which it calls).
pub const TOOLS: &[Tool] = &[
    Tool {
        program: "mkfs.ext4",
        package: "e2fsprogs",
    },
    Tool {
        program: "debugfs",
        package: "e2fsprogs",
    },
    Tool {
        program: "dumpe2fs",
        package: "e2fsprogs",
    },
];

/// GPT entries: 128 of 128 bytes, 32 sectors.
const ENTRIES: usize = 128;
const ENTRY_SIZE: usize = 128;
const ENTRY_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;

const TYPE_BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// The Discoverable Partitions type for an x86-64 root.
const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// A GUID in the mixed-endian byte order GPT stores.
fn guid(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("GUID constant");
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

struct Entry<'a> {
    type_guid: [u8; 16],
    unique: [u8; 16],
    range: (u64, u64),
    name: &'a str,
}

fn entries(parts: &[Entry]) -> Vec<u8> {
    let mut table = vec![0u8; ENTRIES * ENTRY_SIZE];
    for (i, p) in parts.iter().enumerate() {
        let e = &mut table[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
        e[0..16].copy_from_slice(&p.type_guid);
        e[16..32].copy_from_slice(&p.unique);
        e[32..40].copy_from_slice(&p.range.0.to_le_bytes());
        e[40..48].copy_from_slice(&p.range.1.to_le_bytes());
        for (j, unit) in p.name.encode_utf16().enumerate().take(36) {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
        }
    }
    table
}

fn header(
    disk_guid: &[u8; 16],
    my_lba: u64,
    other_lba: u64,
    entries_lba: u64,
    total: u64,
    entries_crc: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; SECTOR as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&other_lba.to_le_bytes());
    h[40..48].copy_from_slice(&(2 + ENTRY_SECTORS).to_le_bytes());
    h[48..56].copy_from_slice(&(total - 2 - ENTRY_SECTORS).to_le_bytes());
    h[56..72].copy_from_slice(disk_guid);
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
    h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[0..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The protective MBR (without boot code) and both GPT copies, written into `disk`.
pub fn write_gpt(disk: &mut File, ctx: &Context, layout: &Layout) -> anyhow::Result<()> {
    let total = layout.total_sectors;
    let table = entries(&[
        Entry {
            type_guid: guid(TYPE_BIOS_BOOT),
            unique: ctx.ids.bios_part_guid,
            range: layout.bios,
            name: "bios-boot",
        },
        Entry {
            type_guid: guid(TYPE_ESP),
            unique: ctx.ids.esp_part_guid,
            range: layout.esp,
            name: "esp",
        },
        Entry {
            type_guid: guid(TYPE_ROOT_X86_64),
            unique: ctx.ids.root_part_guid,
            range: layout.root,
            name: "root",
        },
    ]);
    let crc = crc32fast::hash(&table);

    let mut mbr = vec![0u8; SECTOR as usize];
    let p = &mut mbr[446..462];
    p[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    p[4] = 0xEE;
    p[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    p[8..12].copy_from_slice(&1u32.to_le_bytes());
    p[12..16].copy_from_slice(&((total - 1).min(u32::MAX as u64) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;

    let backup_entries = total - 1 - ENTRY_SECTORS;
    let writes: [(u64, Vec<u8>); 5] = [
        (0, mbr),
        (1, header(&ctx.ids.disk_guid, 1, total - 1, 2, total, crc)),
        (2, table.clone()),
        (backup_entries, table),
        (
            total - 1,
            header(&ctx.ids.disk_guid, total - 1, 1, backup_entries, total, crc),
        ),
    ];
    for (lba, bytes) in writes {
        disk.seek(SeekFrom::Start(lba * SECTOR))?;
        disk.write_all(&bytes)?;
    }
    Ok(())
}

/// Makes the ext4 root file system as a file from the directory tree, with the plan's UUID and hash seed.
pub fn make_root_fs(ctx: &Context, rootfs: &Path, image: &Path, bytes: u64) -> anyhow::Result<()> {
    cmd("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-b", "4096", "-U", &ctx.ids.root_fs_uuid])
        .arg("-E")
        .arg(format!("hash_seed={},root_owner=0:0", ctx.ids.root_hash_seed))
        .arg("-d")
        .arg(rootfs)
        .arg(image)
        .arg(format!("{}k", bytes / 1024))
        .env("E2FSPROGS_FAKE_TIME", ctx.source_date_epoch.to_string())
        .run()
        .context("mkfs.ext4 could not make the root file system")?;
    fix_inode_times(image, ctx.source_date_epoch, &ctx.work)
}

/// The raw disk: an empty sparse file of the configured size with the GPT and the root file system.
pub fn make_disk(ctx: &Context, rootfs: &Path, raw: &Path) -> anyhow::Result<()> {
    let layout = ctx.layout;
    let root_img = ctx.work.join("root.ext4");
    make_root_fs(ctx, rootfs, &root_img, Layout::bytes(layout.root))?;
    let mut disk = OpenOptions::new().create(true).truncate(true).write(true).open(raw)?;
    disk.set_len(layout.total_sectors * SECTOR)?;
    write_gpt(&mut disk, ctx, &layout)?;
    copy_at(&mut disk, &root_img, layout.root.0 * SECTOR, Layout::bytes(layout.root))?;
    std::fs::remove_file(&root_img)?;
    disk.sync_all()?;
    Ok(())
}

/// Sets the change and access times of every inode in a freshly populated ext4 image to `epoch`.
/// `mkfs.ext4 -d` copies them from the host, where a copy's change time is always "now".
fn fix_inode_times(image: &Path, epoch: u64, work: &Path) -> anyhow::Result<()> {
    let header = String::from_utf8_lossy(&cmd("dumpe2fs").arg("-h").arg(image).output()?).into_owned();
    let field = |name: &str| -> anyhow::Result<u64> {
        header
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim_start()
                    .strip_prefix(':')?
                    .trim()
                    .parse()
                    .ok()
            })
            .with_context(|| format!("dumpe2fs printed no `{name}`"))
    };
    // A freshly populated file system allocates inodes in order, so the used ones are 1..=used.
    let used = field("Inode count")? - field("Free inodes")?;
    let mut script = String::new();
    for inode in std::iter::once(2).chain(11..=used) {
        script.push_str(&format!(
            "sif <{inode}> ctime @{epoch}\nsif <{inode}> ctime_extra 0\nsif <{inode}> atime @{epoch}\nsif <{inode}> atime_extra 0\n"
        ));
    }
    let script_path = work.join("inode-times.debugfs");
    std::fs::write(&script_path, script)?;
    cmd("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(image)
        // Otherwise debugfs stamps the superblock with the time it wrote.
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .run()
        .context("debugfs could not set the inode times")?;
    std::fs::remove_file(&script_path)?;
    Ok(())
}
