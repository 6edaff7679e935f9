//! Output formats: chosen from `--format` or the extension of `--out`, each written from the one raw disk.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::process::cmd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
    Vmdk,
    Vhd,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
        }
    }

    fn parse(text: &str) -> anyhow::Result<Format> {
        Ok(match text {
            "qcow2" => Format::Qcow2,
            "raw" | "img" => Format::Raw,
            "vmdk" => Format::Vmdk,
            "vhd" => Format::Vhd,
            "tar.gz" | "gce" | "ova" => {
                bail!("format `{text}` is not supported yet; use qcow2, raw, vmdk or vhd")
            }
            other => bail!("unknown format `{other}`: expected qcow2, raw, vmdk or vhd"),
        })
    }

    fn extension(self) -> &'static str {
        self.name()
    }
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
                "--out {}: no extension to tell the format from; add one (.qcow2, .raw, .vmdk, .vhd) or pass --format",
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
            out.with_extension(format.extension())
        };
        if formats.iter().any(|(f, _)| *f == format) {
            bail!("--format {text} given twice");
        }
        formats.push((format, path));
    }
    Ok(formats)
}

/// Writes `raw` as `format` at `dest`.
pub fn write(format: Format, raw: &Path, dest: &Path) -> anyhow::Result<()> {
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
        Format::Vmdk => cmd("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"])
            .arg(raw)
            .arg(dest)
            .run(),
        Format::Vhd => cmd("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                "subformat=fixed,force_size=on",
            ])
            .arg(raw)
            .arg(dest)
            .run(),
    }
}
