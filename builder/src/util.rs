//! Helpers that several stages and components share: hashing, derived identifiers, sorted directory walks, the
//! kernel version of a root file system, and copying bytes into a disk. It imports no stage and no component.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

use anyhow::{ensure, Context as _};
use sha2::{Digest as _, Sha256};

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// 16 bytes for `label`, derived from the seed, marked as a version-4-style UUID.
pub fn derive(seed: &str, label: &str) -> [u8; 16] {
    let digest = Sha256::digest(format!("{seed}:{label}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

pub fn uuid_text(b: &[u8; 16]) -> String {
    let h = hex(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A directory's entries sorted by name, so walks over a tree do the same in every build.
pub fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<std::fs::DirEntry>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// One line per entry of a tree, in name order: relative path, kind, executable or not, and content hash.
pub fn tree_digest(dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt as _;
    fn walk(root: &Path, dir: &Path, out: &mut String) -> anyhow::Result<()> {
        for entry in sorted_entries(dir)? {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
            let meta = path.symlink_metadata()?;
            if meta.is_dir() {
                out.push_str(&format!("{rel}/\n"));
                walk(root, &path, out)?;
            } else if meta.file_type().is_symlink() {
                out.push_str(&format!("{rel} -> {}\n", std::fs::read_link(&path)?.display()));
            } else {
                let exec = meta.mode() & 0o111 != 0;
                out.push_str(&format!("{rel} {exec} {}\n", sha256_file(&path)?));
            }
        }
        Ok(())
    }
    let mut out = String::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// The newest kernel in `/boot` of a root file system (`6.1.0-28-cloud-amd64` for `vmlinuz-6.1.0-28-cloud-amd64`).
pub fn kernel_version(root: &Path) -> anyhow::Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir(root.join("boot"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix("vmlinuz-").map(String::from))
        .collect();
    versions.sort();
    versions.pop().context("no kernel in /boot of the root file system")
}

/// Copies `src` into `disk` at `offset`, skipping all-zero blocks so the disk stays sparse.
pub fn copy_at(disk: &mut File, src: &Path, offset: u64, limit: u64) -> anyhow::Result<()> {
    let mut file = File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
    let len = file.metadata()?.len();
    ensure!(
        len <= limit,
        "{} is {len} bytes, larger than its partition ({limit} bytes)",
        src.display()
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            disk.seek(SeekFrom::Start(offset + pos))?;
            disk.write_all(&buf[..n])?;
        }
        pos += n as u64;
    }
    Ok(())
}
