//! `PATH.manifest.json` and `PATH.sha256`: what went in (inputs and their hashes, packages), how long each stage took,
//! and what came out.

use std::path::Path;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::context::Context;
use crate::process::{cmd, Tool};

/// What this stage runs on the host.
pub const TOOLS: &[Tool] = &[Tool {
    program: "dpkg-query",
    package: "dpkg",
}];

/// Debian packages installed in the root file system, as (name, version), sorted.
pub fn packages(rootfs: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let out = cmd("dpkg-query")
        .arg(format!("--admindir={}", rootfs.join("var/lib/dpkg").display()))
        .args(["-W", "-f", "${Package}\t${Version}\n"])
        .output()?;
    let mut list: Vec<(String, String)> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_once('\t').map(|(n, v)| (n.to_string(), v.to_string())))
        .collect();
    list.sort();
    Ok(list)
}

pub struct Output {
    pub format: &'static str,
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

pub fn write_manifest(
    ctx: &Context,
    dest: &Path,
    packages: &[(String, String)],
    stages: &[(String, f64)],
    outputs: &[Output],
    checks: &[(&str, &str)],
) -> anyhow::Result<()> {
    let doc = json!({
        "builder": { "name": "imagebuild", "version": env!("CARGO_PKG_VERSION") },
        "seed": ctx.seed,
        "source_date_epoch": ctx.source_date_epoch,
        "inputs": {
            "config": { "origin": ctx.config_origin, "sha256": ctx.config_sha256, "resolved": ctx.config },
            "agent": { "path": ctx.agent_bin.display().to_string(), "sha256": ctx.agent_sha256 },
            "ssh_authorized_keys": ctx.ssh_keys.len(),
            "role": ctx.role,
            "components": ctx.components,
            "rootfs_layer": ctx.layer.key,
            "site": ctx.site.as_ref().map(|tree| json!({
                "root": tree.root.display().to_string(),
                "files": tree.entries.iter().filter(|e| e.source.is_some())
                    .map(|e| json!({ "path": e.path, "sha256": e.sha256, "bytes": e.bytes }))
                    .collect::<Vec<Value>>(),
            })),
        },
        "packages": packages.iter().map(|(n, v)| json!({ "name": n, "version": v })).collect::<Vec<Value>>(),
        "stages": stages.iter().map(|(n, s)| json!({ "name": n, "seconds": (s * 100.0).round() / 100.0 })).collect::<Vec<Value>>(),
        "checks": checks.iter().map(|(n, r)| json!({ "name": n, "result": r })).collect::<Vec<Value>>(),
        "outputs": outputs.iter().map(|o| json!({ "format": o.format, "path": o.path, "sha256": o.sha256, "bytes": o.bytes })).collect::<Vec<Value>>(),
    });
    let text = serde_json::to_string_pretty(&doc)? + "\n";
    std::fs::write(dest, text).with_context(|| format!("cannot write {}", dest.display()))
}
