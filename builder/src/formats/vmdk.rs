//! VMDK, streamOptimized (VMware, VirtualBox, AWS import): qemu-img writes it; we make its bytes reproducible.
//!
//! qemu-img puts a random content id (`CID=`) and the file's own name into the embedded descriptor. The conversion is
//! made under the final file name in a scratch directory, and the id is replaced by one derived from the build seed.

use std::path::Path;

use anyhow::{bail, Context as _};

use crate::process::cmd;

/// Converts `raw` to a streamOptimized VMDK at `dest`, whose descriptor names `name` and carries content id `cid`.
pub fn write(raw: &Path, dest: &Path, name: &str, cid: u32, scratch: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let made = scratch.join(name);
    cmd("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized,adapter_type=lsilogic",
        ])
        .arg(raw)
        .arg(&made)
        .run()?;
    set_cid(&made, cid)?;
    std::fs::rename(&made, dest)
        .or_else(|_| std::fs::copy(&made, dest).map(|_| ()))
        .with_context(|| format!("cannot move the VMDK to {}", dest.display()))?;
    let _ = std::fs::remove_file(&made);
    Ok(())
}

/// Rewrites the descriptor's `CID=xxxxxxxx` line in place (same length, so nothing else moves).
fn set_cid(path: &Path, cid: u32) -> anyhow::Result<()> {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut head = vec![0u8; 64 * 1024];
    let n = file.read(&mut head)?;
    let head = &head[..n];
    let Some(at) = head.windows(5).position(|w| w == b"\nCID=") else {
        bail!("{}: no CID line in the VMDK descriptor", path.display());
    };
    file.seek(SeekFrom::Start((at + 5) as u64))?;
    file.write_all(format!("{cid:08x}").as_bytes())?;
    file.sync_all()?;
    Ok(())
}
