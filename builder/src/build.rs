//! The driver: `build_image` runs the stages in order, times each one, and publishes the outputs atomically.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};

use crate::bootloader::{self, install_bootloader, write_grub_config};
use crate::context::Context;
use crate::disk::{self, make_disk};
use crate::formats;
use crate::initrd::make_initrd;
use crate::manifest::{self, write_manifest, Output};
use crate::normalize::normalize_rootfs;
use crate::overlay::install_overlay;
use crate::process::{cmd, require, Tool};
use crate::rootfs::{self, bootstrap_rootfs};
use crate::util::sha256_file;

/// The host tools of every stage; the plan adds those of the role's components (`Context::host_tools`).
pub const STAGE_TOOLS: &[&[Tool]] = &[
    rootfs::TOOLS,
    disk::TOOLS,
    bootloader::TOOLS,
    formats::TOOLS,
    manifest::TOOLS,
    crate::config::TOOLS,
];

/// Removes the work directory and any unpublished output however the build ends.
struct Cleanup {
    paths: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.paths {
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(p);
            } else {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

struct Stages {
    timings: Vec<(String, f64)>,
    interrupted: Arc<AtomicBool>,
}

impl Stages {
    fn run<T>(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        if self.interrupted.load(Ordering::SeqCst) {
            bail!("interrupted before {name}; nothing was written");
        }
        tracing::info!("{name}: started");
        let start = Instant::now();
        let result = f().with_context(|| format!("stage {name} failed"));
        let secs = start.elapsed().as_secs_f64();
        if self.interrupted.load(Ordering::SeqCst) {
            bail!("interrupted during {name}; nothing was written");
        }
        let value = result?;
        tracing::info!("{name}: done in {secs:.1} s");
        self.timings.push((name.to_string(), secs));
        Ok(value)
    }
}

/// The secret check: none of the per-instance files the components declare may be in the root file system, nor a
/// machine id, a private key under /etc/ssl/private or a password hash.
fn check_secrets(ctx: &Context, rootfs: &Path) -> anyhow::Result<()> {
    let mut found: Vec<String> = ctx
        .instance_files
        .iter()
        .filter(|f| rootfs.join(f).symlink_metadata().is_ok())
        .map(|f| format!("/{f}"))
        .collect();
    if std::fs::read(rootfs.join("etc/machine-id"))
        .map(|b| !b.is_empty())
        .unwrap_or(false)
    {
        found.push("/etc/machine-id (not empty)".to_string());
    }
    for entry in std::fs::read_dir(rootfs.join("etc/ssl/private"))
        .into_iter()
        .flatten()
        .flatten()
    {
        found.push(
            entry
                .path()
                .strip_prefix(rootfs)
                .unwrap_or(&entry.path())
                .display()
                .to_string(),
        );
    }
    let shadow = std::fs::read_to_string(rootfs.join("etc/shadow")).unwrap_or_default();
    for line in shadow.lines() {
        let hash = line.split(':').nth(1).unwrap_or("");
        if !hash.is_empty() && !hash.starts_with('!') && !hash.starts_with('*') {
            found.push(format!(
                "/etc/shadow: a password hash for `{}`",
                line.split(':').next().unwrap_or("")
            ));
        }
    }
    if !found.is_empty() {
        bail!(
            "per-instance or secret files would ship in the image: {}",
            found.join(", ")
        );
    }
    Ok(())
}

/// Fails with one message naming every host tool (or GRUB file) the stages and the role's components need that is
/// missing, and the packages that provide them.
pub fn check_host(ctx: &Context) -> anyhow::Result<()> {
    let files = bootloader::host_files();
    let files: Vec<(&Path, &'static str)> = files.iter().map(|(p, pkg)| (*p, *pkg)).collect();
    require(&ctx.host_tools, &files)
}

pub fn build_image(ctx: &Context, interrupted: Arc<AtomicBool>) -> anyhow::Result<()> {
    check_host(ctx)?;
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(&ctx.work);
    std::fs::create_dir_all(&ctx.work).with_context(|| format!("cannot create {}", ctx.work.display()))?;
    let mut cleanup = Cleanup {
        paths: vec![ctx.work.clone()],
    };
    let mut stages = Stages {
        timings: Vec::new(),
        interrupted,
    };
    let rootfs = ctx.work.join("rootfs");

    match &ctx.cache_dir {
        Some(cache) => {
            let layer = match rootfs::lookup_layer(ctx, cache) {
                Some(layer) => {
                    tracing::info!(layer = %layer.display(), "package layer from cache");
                    layer
                }
                None => {
                    let partial = rootfs::begin_layer(ctx, cache)?;
                    cleanup.paths.push(partial.clone());
                    stages.run("bootstrap_rootfs", || bootstrap_rootfs(ctx, &partial))?;
                    rootfs::commit_layer(ctx, cache, &partial)?
                }
            };
            stages.run("copy_layer", || {
                cmd("cp").args(["-a", "--reflink=auto"]).arg(&layer).arg(&rootfs).run()
            })?;
        }
        None => stages.run("bootstrap_rootfs", || bootstrap_rootfs(ctx, &rootfs))?,
    }
    let packages = manifest::packages(&rootfs)?;
    stages.run("install_overlay", || install_overlay(ctx, &rootfs))?;
    stages.run("make_initrd", || make_initrd(ctx, &rootfs))?;
    stages.run("write_grub_config", || write_grub_config(ctx, &rootfs))?;
    stages.run("check_secrets", || check_secrets(ctx, &rootfs))?;
    stages.run("normalize_rootfs", || normalize_rootfs(&rootfs, ctx.source_date_epoch))?;
    let raw = ctx.work.join("disk.raw");
    stages.run("make_disk", || make_disk(ctx, &rootfs, &raw))?;
    std::fs::remove_dir_all(&rootfs)?;
    stages.run("install_bootloader", || install_bootloader(ctx, &raw))?;

    // Every output is written beside its destination under a temporary name, then renamed.
    let mut outputs = Vec::new();
    let mut renames = Vec::new();
    for (format, dest) in &ctx.formats {
        let partial = partial_name(dest);
        cleanup.paths.push(partial.clone());
        let stamp = formats::Stamp {
            epoch: ctx.source_date_epoch,
            seed: &ctx.seed,
            name: output_stem(&ctx.out),
            scratch: ctx.work.join("formats"),
        };
        stages.run(&format!("write_formats ({})", format.name()), || {
            formats::write(*format, &raw, &partial, &stamp)
        })?;
        outputs.push(Output {
            format: format.name(),
            path: dest.display().to_string(),
            sha256: sha256_file(&partial)?,
            bytes: std::fs::metadata(&partial)?.len(),
        });
        renames.push((partial, dest.clone()));
    }

    let main = &ctx.out;
    let manifest_path = sidecar(main, "manifest.json");
    let sha_path = sidecar(main, "sha256");
    let manifest_partial = partial_name(&manifest_path);
    let sha_partial = partial_name(&sha_path);
    cleanup.paths.push(manifest_partial.clone());
    cleanup.paths.push(sha_partial.clone());
    stages
        .timings
        .push(("total".to_string(), started.elapsed().as_secs_f64()));
    write_manifest(
        ctx,
        &manifest_partial,
        &packages,
        &stages.timings,
        &outputs,
        &[("no-instance-files", "passed")],
    )?;
    let sums: String = outputs
        .iter()
        .map(|o| {
            format!(
                "{}  {}\n",
                o.sha256,
                Path::new(&o.path).file_name().unwrap_or_default().to_string_lossy()
            )
        })
        .collect();
    std::fs::write(&sha_partial, sums)?;

    // Sidecars first, images last: an image that exists always has its manifest.
    std::fs::rename(&manifest_partial, &manifest_path)?;
    std::fs::rename(&sha_partial, &sha_path)?;
    for (partial, dest) in renames {
        std::fs::rename(&partial, &dest).with_context(|| format!("cannot move the image to {}", dest.display()))?;
    }
    for o in &outputs {
        tracing::info!(
            "wrote {} ({}, {} MB, sha256 {})",
            o.path,
            o.format,
            o.bytes / 1_000_000,
            o.sha256
        );
    }
    tracing::info!("build finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `foobar` for `--out foobar.qcow2` (and for `foobar.tar.gz`): the machine's name in an OVA.
fn output_stem(out: &Path) -> String {
    let stem = formats::stem(out);
    if stem.is_empty() {
        "foobar".to_string()
    } else {
        stem
    }
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{suffix}"));
    PathBuf::from(name)
}

fn partial_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}
