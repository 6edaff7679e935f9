//! What makes two builds from the same inputs byte-identical beyond the derived identifiers: no logs or caches that
//! record when or in which order things ran, and every timestamp in the tree clamped to `SOURCE_DATE_EPOCH`. (The
//! times the host cannot set, inode change times, are rewritten in the file system by `disk.rs`.)

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use anyhow::{bail, Context as _};

use crate::util::sorted_entries;

/// Left behind by package installation (files, or directories with what they hold); their contents depend on when and
/// in which order things ran.
const VOLATILE: &[&str] = &[
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/bootstrap.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/ldconfig/aux-cache",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    // apt's lock files and download directories: their times and owner (root, or _apt once apt has downloaded into
    // them) depend on whether the packages came from the archive or from the .deb cache. apt makes them again when
    // it needs them.
    "var/cache/apt/archives/lock",
    "var/cache/apt/archives/partial",
    "var/lib/apt/lists/lock",
    "var/lib/apt/lists/partial",
];

/// Removes the volatile files, then sets every modification time later than `epoch` to `epoch` and every access
/// time to the modification time. Runs last on the tree: any later change would move a directory's time again.
pub fn normalize_rootfs(rootfs: &Path, epoch: u64) -> anyhow::Result<usize> {
    for path in VOLATILE {
        let full = rootfs.join(path);
        match full.symlink_metadata() {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&full),
            Ok(_) => std::fs::remove_file(&full),
            Err(_) => continue,
        }
        .with_context(|| format!("cannot remove {}", full.display()))?;
    }
    let mut count = 0;
    clamp_tree(rootfs, epoch as i64, epoch as i64, &mut count)?;
    Ok(count)
}

/// The time every file the package layer's bootstrap made or changed gets (2023-11-14, `plan::FALLBACK_EPOCH`).
pub const LAYER_EPOCH: i64 = 1_700_000_000;

/// Sets the times of everything the bootstrap that began at `started` (seconds since the epoch) made or changed to
/// `LAYER_EPOCH`: a layer made today and one made last week then hold the same times, and the files of packages keep
/// theirs (from the .deb, older than any bootstrap). Without it, `normalize_rootfs` clamped only the times after
/// `SOURCE_DATE_EPOCH`, so a layer cached before the last commit kept the hour it was made in 2,114 files.
pub fn settle_layer_times(layer: &Path, started: i64) -> anyhow::Result<usize> {
    let mut count = 0;
    clamp_tree(layer, started, LAYER_EPOCH, &mut count)?;
    Ok(count)
}

/// Every time at or after `from` becomes `to`, in `dir` and below.
fn clamp_tree(dir: &Path, from: i64, to: i64, count: &mut usize) -> anyhow::Result<()> {
    for entry in sorted_entries(dir)? {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            clamp_tree(&path, from, to, count)?;
        }
        clamp(&path, from, to)?;
        *count += 1;
    }
    // The directory itself last: clamping its children does not change it, but be explicit about the order.
    clamp(dir, from, to)
}

fn clamp(path: &Path, from: i64, to: i64) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = path.symlink_metadata()?;
    let (sec, nsec) = if meta.mtime() >= from {
        (to, 0)
    } else {
        (meta.mtime(), meta.mtime_nsec())
    };
    let time = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as _,
    };
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid C string and two valid timespecs; AT_SYMLINK_NOFOLLOW sets a link's own times.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            [time, time].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        bail!(
            "cannot set the times of {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
