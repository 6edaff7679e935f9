//! The package layer: Debian from the archive by mmdebstrap, cached by everything that decides its contents.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::context::{sha256_hex, Context};
use crate::process::cmd;

/// What every image holds, before the config's own packages.
pub const BASE_PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "dbus",
    "nginx-light",
    "mariadb-server",
    "openssh-server",
    "sudo",
    "e2fsprogs",
    "fdisk",
    "iproute2",
    "nftables",
    "openssl",
];

/// Paths dpkg never unpacks: documentation, manual pages and translations the server does not need.
const EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
];

pub fn packages(ctx: &Context) -> Vec<String> {
    let mut all: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
    all.extend(ctx.config.debian.packages.iter().cloned());
    all.sort();
    all.dedup();
    all
}

/// The cache key: suite, mirror, package list, exclusions and this builder's version.
pub fn cache_key(ctx: &Context) -> String {
    let text = format!(
        "suite={}\nmirror={}\npackages={}\nexcludes={}\nbuilder={}",
        ctx.config.debian.suite,
        ctx.config.debian.mirror,
        packages(ctx).join(","),
        EXCLUDES.join(","),
        env!("CARGO_PKG_VERSION")
    );
    sha256_hex(text.as_bytes())[..16].to_string()
}

/// Runs mmdebstrap into `dest` (a directory that must not exist).
pub fn bootstrap_rootfs(ctx: &Context, dest: &Path) -> anyhow::Result<()> {
    let mut c = cmd("mmdebstrap")
        .args(["--variant=apt", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", packages(ctx).join(",")))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg("--aptopt=Acquire::Retries \"3\"");
    for e in EXCLUDES {
        c = c.arg(format!("--dpkgopt={e}"));
    }
    c = c
        .arg("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin")
        .env("SOURCE_DATE_EPOCH", ctx.source_date_epoch.to_string())
        .arg(&ctx.config.debian.suite)
        .arg(dest);
    if !ctx.config.debian.mirror.is_empty() {
        c = c.arg(&ctx.config.debian.mirror);
    }
    c.progress()
        .run()
        .context("mmdebstrap could not build the root file system")
}

fn layer_paths(ctx: &Context, cache: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let key = cache_key(ctx);
    (
        cache.join(format!("rootfs-{key}")),
        cache.join(format!("rootfs-{key}.complete")),
        cache.join(format!("rootfs-{key}.partial")),
    )
}

/// The cached package layer for this build, if a complete one exists.
pub fn lookup_layer(ctx: &Context, cache: &Path) -> Option<PathBuf> {
    let (dir, complete, _) = layer_paths(ctx, cache);
    (dir.is_dir() && complete.is_file()).then_some(dir)
}

/// Clears leftovers of an interrupted build and returns where to bootstrap the new layer.
pub fn begin_layer(ctx: &Context, cache: &Path) -> anyhow::Result<PathBuf> {
    let (dir, complete, partial) = layer_paths(ctx, cache);
    // Anything without the completion marker is a leftover of an interrupted build: never used.
    let _ = std::fs::remove_file(&complete);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create cache directory {}", cache.display()))?;
    Ok(partial)
}

/// Moves a finished bootstrap into the cache; the marker is written last.
pub fn commit_layer(ctx: &Context, cache: &Path, partial: &Path) -> anyhow::Result<PathBuf> {
    let (dir, complete, _) = layer_paths(ctx, cache);
    std::fs::rename(partial, &dir)?;
    std::fs::write(&complete, b"")?;
    Ok(dir)
}
