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

/// Rewrites the descriptor's `CID=` value as 8 hex digits. qemu-img prints it without leading zeros, so the old
/// value may be shorter; the rest of the descriptor text moves with it inside the zero-padded descriptor area.
pub fn set_cid(path: &Path, cid: u32) -> anyhow::Result<()> {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut head = vec![0u8; 64 * 1024];
    let n = file.read(&mut head)?;
    let head = &head[..n];
    let Some(at) = head.windows(5).position(|w| w == b"\nCID=") else {
        bail!("{}: no CID line in the VMDK descriptor", path.display());
    };
    let value = at + 5;
    let line_end = head[value..].iter().position(|b| *b == b'\n').map(|i| value + i);
    let text_end = head[value..].iter().position(|b| *b == 0).map(|i| value + i);
    let (Some(line_end), Some(text_end)) = (line_end, text_end) else {
        bail!("{}: the VMDK descriptor does not end where expected", path.display());
    };
    // The descriptor area is padded with zeros well beyond its text: room for the one digit qemu-img may leave out.
    if head
        .get(text_end..text_end + 16)
        .is_none_or(|pad| pad.iter().any(|b| *b != 0))
    {
        bail!("{}: no padding after the VMDK descriptor", path.display());
    }
    let mut tail = format!("{cid:08x}").into_bytes();
    tail.extend_from_slice(&head[line_end..text_end]);
    tail.resize(tail.len().max(text_end - value), 0);
    file.seek(SeekFrom::Start(value as u64))?;
    file.write_all(&tail)?;
    file.sync_all()?;
    Ok(())
}
