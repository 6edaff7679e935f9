//! Fixed VHD (Azure): the raw disk, padded to a size whose CHS geometry is exact, followed by a 512-byte footer.
//!
//! Readers disagree on a VHD's size: Hyper-V and Azure take the footer's "current size", Virtual PC and QEMU (for
//! creators they do not know) the size the CHS geometry gives. Padding the disk to a multiple of 1 MiB whose CHS
//! geometry covers it exactly makes every reader see the same disk, and Azure's 1 MiB alignment rule holds.

use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::Path;

use anyhow::Context as _;

use crate::process::cmd;

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
const VHD_EPOCH: u64 = 946_684_800;
/// The largest disk CHS can describe (65535 cylinders, 16 heads, 255 sectors); beyond, readers use the footer size.
const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;

/// The geometry of the VHD specification's algorithm for `sectors`: (cylinders, heads, sectors per track).
pub fn geometry(sectors: u64) -> (u16, u8, u8) {
    let total = sectors.min(MAX_CHS_SECTORS);
    let (spt, heads, cylinder_times_heads) = if total >= 65535 * 16 * 63 {
        (255, 16, total / 255)
    } else {
        let mut spt = 17;
        let mut cth = total / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
        (spt, heads, cth)
    };
    ((cylinder_times_heads / heads) as u16, heads as u8, spt as u8)
}

/// The smallest size at least `size`, a multiple of 1 MiB, that the CHS geometry covers exactly (or that is beyond
/// what CHS can describe).
pub fn padded_size(size: u64) -> u64 {
    let mut candidate = size.div_ceil(MIB) * MIB;
    loop {
        let sectors = candidate / SECTOR;
        let (c, h, s) = geometry(sectors);
        if sectors >= MAX_CHS_SECTORS || u64::from(c) * u64::from(h) * u64::from(s) == sectors {
            return candidate;
        }
        candidate += MIB;
    }
}

/// The footer for a fixed disk of `size` bytes.
pub fn footer(size: u64, unique_id: [u8; 16], epoch: u64) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit, always set
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: none for a fixed disk
    f[24..28].copy_from_slice(&(epoch.saturating_sub(VHD_EPOCH) as u32).to_be_bytes());
    f[28..32].copy_from_slice(b"fbar"); // creator application
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // creator version
    f[36..40].copy_from_slice(b"Wi2k"); // creator host OS, as Azure's own tools write it
    f[40..48].copy_from_slice(&size.to_be_bytes()); // original size
    f[48..56].copy_from_slice(&size.to_be_bytes()); // current size
    let (c, h, s) = geometry(size / SECTOR);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&2u32.to_be_bytes()); // disk type: fixed
    f[68..84].copy_from_slice(&unique_id);
    let sum = f.iter().fold(0u32, |acc, b| acc.wrapping_add(u32::from(*b)));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f
}

/// Writes `raw` as a fixed VHD at `dest`: a sparse copy, the padding, the footer.
pub fn write(raw: &Path, dest: &Path, unique_id: [u8; 16], epoch: u64) -> anyhow::Result<()> {
    cmd("cp").arg("--sparse=always").arg(raw).arg(dest).run()?;
    let size = padded_size(std::fs::metadata(raw)?.len());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(dest)
        .with_context(|| format!("cannot open {}", dest.display()))?;
    file.set_len(size)?;
    file.seek(SeekFrom::Start(size))?;
    file.write_all(&footer(size, unique_id, epoch))
        .with_context(|| format!("cannot write the VHD footer to {}", dest.display()))?;
    file.sync_all()?;
    Ok(())
}
