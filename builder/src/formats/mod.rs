//! Output formats: chosen from `--format` or the extension of `--out`, each written from the one raw disk.
//! qcow2 and raw here; `vhd.rs` (fixed VHD, Azure), `vmdk.rs` (streamOptimized), `ova.rs` (OVF + manifest + VMDK)
//! and `gce.rs` (sparse `disk.raw` in a GNU tar.gz) for the others.

pub mod gce;
pub mod ova;
pub mod vhd;
pub mod vmdk;

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::process::{cmd, Tool};

/// What this stage runs on the host.
pub const TOOLS: &[Tool] = &[Tool {
    program: "qemu-img",
    package: "qemu-utils",
}];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
    Vmdk,
    Vhd,
    Gce,
    Ova,
}

const EXPECTED: &str = "qcow2, raw, vmdk, vhd, tar.gz (GCE) or ova";

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Gce => "tar.gz",
            Format::Ova => "ova",
        }
    }

    fn parse(text: &str) -> anyhow::Result<Format> {
        Ok(match text {
            "qcow2" => Format::Qcow2,
            "raw" | "img" => Format::Raw,
            "vmdk" => Format::Vmdk,
            "vhd" => Format::Vhd,
            "tar.gz" | "gce" => Format::Gce,
            "ova" => Format::Ova,
            other => bail!("unknown format `{other}`: expected {EXPECTED}"),
        })
    }

    fn extension(self) -> &'static str {
        self.name()
    }
}

/// The file name of `out` without its extension (`.tar.gz` counted as one): `foobar` for `foobar.tar.gz`.
pub fn stem(out: &Path) -> String {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".tar.gz")
        .or_else(|| name.rsplit_once('.').map(|(stem, _)| stem))
        .unwrap_or(&name)
        .to_string()
}

/// `out` with its extension replaced by `ext`.
fn sibling(out: &Path, ext: &str) -> PathBuf {
    out.with_file_name(format!("{}.{ext}", stem(out)))
}

/// What the writers derive names, identifiers and times from.
pub struct Stamp<'a> {
    /// `SOURCE_DATE_EPOCH`: every time stamp in an output.
    pub epoch: u64,
    /// The build seed: the VHD's unique id, the VMDK's content id.
    pub seed: &'a str,
    /// The machine's name in an OVA (the output's stem).
    pub name: String,
    /// A directory for intermediate files.
    pub scratch: PathBuf,
}

/// Which formats to write and where: `--format` values, or the extension of `--out`.
pub fn plan(out: &Path, requested: &[String]) -> anyhow::Result<Vec<(Format, PathBuf)>> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if requested.is_empty() {
        let Some((_, ext)) = name.split_once('.') else {
            bail!(
                "--out {}: no extension to tell the format from; add one (.qcow2, .raw, .vmdk, .vhd, .tar.gz, .ova) or pass --format",
                out.display()
            );
        };
        let ext = ext.rsplit('.').next().unwrap_or(ext);
        let ext = if name.ends_with(".tar.gz") { "tar.gz" } else { ext };
        return Ok(vec![(Format::parse(ext)?, out.to_path_buf())]);
    }
    let mut formats = Vec::new();
    for (i, text) in requested.iter().enumerate() {
        let format = Format::parse(text)?;
        // The first format goes to --out; the others beside it with their own extension.
        let path = if i == 0 {
            out.to_path_buf()
        } else {
            sibling(out, format.extension())
        };
        if formats.iter().any(|(f, _)| *f == format) {
            bail!("--format {text} given twice");
        }
        formats.push((format, path));
    }
    Ok(formats)
}

/// Writes `raw` as `format` at `dest`.
pub fn write(format: Format, raw: &Path, dest: &Path, stamp: &Stamp) -> anyhow::Result<()> {
    match format {
        Format::Raw => {
            // A sparse copy: holes stay holes.
            cmd("cp").arg("--sparse=always").arg(raw).arg(dest).run()
        }
        // -c compresses clusters; zstd (QEMU 5.1 and later, so qemu-img 7.2 opens it) is four times as fast as
        // zlib here and a little smaller. In-order writes (no -W) keep the output byte-identical between builds.
        Format::Qcow2 => cmd("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-c",
                "-o",
                "compat=1.1,compression_type=zstd",
            ])
            .arg(raw)
            .arg(dest)
            .run(),
        Format::Vmdk => vmdk::write(
            raw,
            dest,
            &disk_file_name(dest),
            cid(stamp),
            &stamp.scratch.join("vmdk"),
        ),
        Format::Vhd => vhd::write(raw, dest, crate::util::derive(stamp.seed, "vhd-unique-id"), stamp.epoch),
        Format::Gce => gce::write(raw, dest, stamp.epoch),
        Format::Ova => {
            let disk_file = format!("{}-disk1.vmdk", stamp.name);
            let scratch = stamp.scratch.join("ova");
            let vmdk_path = scratch.join("disk.vmdk");
            vmdk::write(raw, &vmdk_path, &disk_file, cid(stamp), &scratch.join("convert"))?;
            let machine = ova::Machine {
                name: &stamp.name,
                cpus: 2,
                memory_mib: 2048,
                firmware: "bios",
            };
            let capacity = std::fs::metadata(raw)?.len();
            ova::write(dest, &machine, &vmdk_path, &disk_file, capacity, stamp.epoch)?;
            let _ = std::fs::remove_file(&vmdk_path);
            Ok(())
        }
    }
}

/// The VMDK's content id, from the seed.
fn cid(stamp: &Stamp) -> u32 {
    let b = crate::util::derive(stamp.seed, "vmdk-cid");
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The name a VMDK's descriptor gives its own extent: the published file name, not the temporary one.
fn disk_file_name(dest: &Path) -> String {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // `.NAME.partial-PID` → `NAME`
    name.strip_prefix('.')
        .and_then(|n| n.rsplit_once(".partial-").map(|(n, _)| n.to_string()))
        .unwrap_or(name)
}
