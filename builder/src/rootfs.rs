//! The package layer: Debian from the archive by mmdebstrap, cached by everything that decides its contents.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::context::Context;
use crate::process::{cmd, Tool};
use crate::util::{hex, sha256_hex, sorted_entries};

/// What this stage runs on the host (and `manifest`'s package list reads the layer with dpkg-query).
pub const TOOLS: &[Tool] = &[Tool {
    program: "mmdebstrap",
    package: "mmdebstrap",
}];

/// Runs mmdebstrap into `dest` (a directory that must not exist).
pub fn bootstrap_rootfs(ctx: &Context, dest: &Path) -> anyhow::Result<()> {
    let layer = &ctx.layer;
    let mut c = cmd("mmdebstrap")
        .args(["--variant=apt", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", layer.packages.join(",")))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg("--aptopt=Acquire::Retries \"3\"");
    for e in &layer.dpkg_rules {
        c = c.arg(format!("--dpkgopt={e}"));
    }
    // The components' hooks read their files from the host; they run as root with the new tree as "$1".
    let mut hook_files = Vec::new();
    let mut hooks = Vec::new();
    for hook in &layer.hooks {
        let file = dest.with_extension(hook.key);
        std::fs::write(&file, hook.file).with_context(|| format!("cannot write {}", file.display()))?;
        hooks.push(format!(
            "--customize-hook={}",
            hook.command.replace("{file}", &file.display().to_string())
        ));
        hook_files.push(file);
    }
    // The archive's Release files as this layer saw them, so a later build can tell whether the archive moved on.
    let releases = format!(
        "--customize-hook=(cd \"$1/var/lib/apt/lists\" && for f in *Release; do [ -e \"$f\" ] && sha256sum \"$f\"; done; true) > '{}'",
        releases_record(dest).display()
    );
    if let Some(debs) = ctx.cache_dir.as_ref().map(|c| c.join("debs")) {
        // Downloaded packages are kept beside the layers and offered to the next bootstrap (mmdebstrap's recipe).
        std::fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;
        c = c
            .arg("--skip=essential/unlink")
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
            .arg(format!(
                "--setup-hook=sync-in '{}' /var/cache/apt/archives/",
                debs.display()
            ))
            .arg(format!(
                "--customize-hook=sync-out /var/cache/apt/archives '{}'",
                debs.display()
            ));
    }
    // The image keeps the same rules for later package installs and upgrades (`/etc/dpkg/dpkg.cfg.d`).
    let dpkg_rules: String = layer
        .dpkg_rules
        .iter()
        .map(|e| e.to_string())
        .chain(layer.late_excludes.iter().map(|p| format!("path-exclude={p}")))
        .collect::<Vec<_>>()
        .join("\n");
    let slim = format!(
        "--customize-hook=rm -rf {} && printf '%s\\n' '# foobar: what the image leaves out; see imagebuild (rootfs.rs)' '{}' > \"$1/etc/dpkg/dpkg.cfg.d/foobar-excludes\"",
        layer
            .late_excludes
            .iter()
            .map(|p| format!("\"$1\"{p}"))
            .collect::<Vec<_>>()
            .join(" "),
        dpkg_rules.replace('\n', "' '")
    );
    c = c
        .arg(slim)
        .arg(releases)
        .args(hooks)
        .arg("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin")
        .env("SOURCE_DATE_EPOCH", ctx.source_date_epoch.to_string())
        // Positional arguments from here on, whatever they start with.
        .arg("--")
        .arg(&ctx.config.debian.suite)
        .arg(dest);
    if !ctx.config.debian.mirror.is_empty() {
        c = c.arg(&ctx.config.debian.mirror);
    }
    // A second of margin: a file system may keep coarser times than the clock.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64 - 1)
        .unwrap_or(0);
    let result = c.progress().run();
    for file in hook_files {
        let _ = std::fs::remove_file(file);
    }
    result.map_err(|err| match missing_package(ctx, &format!("{err:#}")) {
        Some(named) => err.context(named),
        None => err.context("mmdebstrap could not build the root file system"),
    })?;
    crate::normalize::settle_layer_times(dest, started)?;
    Ok(())
}

/// When apt did not find a package the config asked for, says which key named it.
fn missing_package(ctx: &Context, output: &str) -> Option<String> {
    let name = output.lines().find_map(|line| {
        let rest = line
            .split_once("Unable to locate package ")
            .map(|(_, r)| r.trim())
            .or_else(|| {
                line.split_once("Package '")
                    .filter(|(_, r)| r.contains("has no installation candidate"))
                    .and_then(|(_, r)| r.split_once('\'').map(|(n, _)| n))
            })?;
        Some(rest.split_whitespace().next()?.to_string())
    })?;
    let named_by = if ctx.config.app.as_ref().is_some_and(|a| a.packages.contains(&name)) {
        "key `app.packages`"
    } else if ctx.config.debian.packages.contains(&name) {
        "key `debian.packages`"
    } else {
        "the role's components (`role`)"
    };
    Some(format!(
        "{named_by}: the Debian archive ({}) has no package `{name}`; check the name (apt-cache search on a Debian {} machine)",
        ctx.config.debian.suite, ctx.config.debian.suite
    ))
}

fn layer_paths(ctx: &Context, cache: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let key = &ctx.layer.key;
    (
        cache.join(format!("rootfs-{key}")),
        cache.join(format!("rootfs-{key}.complete")),
        cache.join(format!("rootfs-{key}.partial")),
    )
}

/// A digest of a tree's shape: every entry's path, type, mode, owner, size, modification time and link target.
/// A layer whose fingerprint no longer matches its completion marker was changed or damaged after it was cached.
pub fn fingerprint(dir: &Path) -> anyhow::Result<String> {
    use sha2::{Digest as _, Sha256};
    use std::os::unix::fs::MetadataExt as _;
    fn walk(root: &Path, dir: &Path, hasher: &mut Sha256) -> anyhow::Result<()> {
        for entry in sorted_entries(dir)? {
            let path = entry.path();
            let meta = path.symlink_metadata()?;
            let link = if meta.file_type().is_symlink() {
                std::fs::read_link(&path)?.display().to_string()
            } else {
                String::new()
            };
            let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
            hasher.update(
                format!(
                    "{rel}\0{:o}\0{}:{}\0{}\0{}\0{link}\n",
                    meta.mode(),
                    meta.uid(),
                    meta.gid(),
                    if meta.is_dir() { 0 } else { meta.size() },
                    meta.mtime()
                )
                .as_bytes(),
            );
            if meta.is_dir() {
                walk(root, &path, hasher)?;
            }
        }
        Ok(())
    }
    let mut hasher = Sha256::new();
    walk(dir, dir, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// Whether a cached layer is whole: its completion marker exists and records the layer's current fingerprint.
pub fn check_layer(dir: &Path, marker: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err("no layer".to_string());
    }
    let recorded =
        std::fs::read_to_string(marker).map_err(|_| "no completion marker (an interrupted build)".to_string())?;
    let actual = fingerprint(dir).map_err(|err| format!("unreadable: {err:#}"))?;
    if recorded.trim() != actual {
        return Err("its files changed after it was cached".to_string());
    }
    Ok(())
}

/// The cached package layer for this build, if a complete and intact one exists; a damaged one is reported and
/// left for `begin_layer` to replace.
pub fn lookup_layer(ctx: &Context, cache: &Path) -> Option<PathBuf> {
    let (dir, complete, _) = layer_paths(ctx, cache);
    if !dir.exists() && !complete.exists() {
        return None;
    }
    if let Err(why) = check_layer(&dir, &complete) {
        tracing::warn!(
            "the cached package layer {} is not usable ({why}); building it again",
            dir.display()
        );
        return None;
    }
    match archive_changed(&dir) {
        Ok(Some(which)) => {
            tracing::info!("the Debian archive changed since the cached layer was built ({which}); building it again");
            None
        }
        Ok(None) => Some(dir),
        Err(why) => {
            tracing::warn!("cannot tell whether the Debian archive changed ({why:#}); using the cached layer");
            Some(dir)
        }
    }
}

/// Where a layer's record of the archive's Release files is kept: beside it, outside the image.
fn releases_record(layer: &Path) -> PathBuf {
    let name = layer
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    layer.with_file_name(format!("{}.releases", name.trim_end_matches(".partial")))
}

/// apt's name for a downloaded index: the URL without its scheme, `/` turned into `_`.
fn apt_list_name(url: &str) -> String {
    url.split_once("://").map_or(url, |(_, rest)| rest).replace('/', "_")
}

/// Compares the Release files recorded when the layer was built with what the archive serves now, for every
/// `deb` line of the layer's own sources. `Some(url)` names the first that changed.
fn archive_changed(layer: &Path) -> anyhow::Result<Option<String>> {
    let Ok(text) = std::fs::read_to_string(releases_record(layer)) else {
        return Ok(None); // built before Release files were recorded
    };
    let recorded: std::collections::HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(h, f)| (f.trim(), h)))
        .collect();
    let sources = std::fs::read_to_string(layer.join("etc/apt/sources.list")).unwrap_or_default();
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(15))
        .build();
    for line in sources.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(&"deb"), Some(uri), Some(suite)) = (fields.first(), fields.get(1), fields.get(2)) else {
            continue;
        };
        let url = format!("{}/dists/{suite}/InRelease", uri.trim_end_matches('/'));
        let Some(old) = recorded.get(apt_list_name(&url).as_str()) else {
            continue;
        };
        let mut body = Vec::new();
        let response = agent.get(&url).call().with_context(|| format!("GET {url}"))?;
        std::io::Read::read_to_end(&mut response.into_reader(), &mut body).with_context(|| format!("reading {url}"))?;
        if sha256_hex(&body) != *old {
            return Ok(Some(url));
        }
    }
    Ok(None)
}

/// Records a finished layer's fingerprint in its completion marker, written last (through a temporary name).
pub fn seal_layer(dir: &Path, marker: &Path) -> anyhow::Result<()> {
    let print = fingerprint(dir)?;
    let mut temp = marker.as_os_str().to_owned();
    temp.push(".tmp");
    std::fs::write(&temp, format!("{print}\n"))?;
    std::fs::rename(&temp, marker)?;
    Ok(())
}

/// Clears leftovers of an interrupted build and returns where to bootstrap the new layer.
pub fn begin_layer(ctx: &Context, cache: &Path) -> anyhow::Result<PathBuf> {
    let (dir, complete, partial) = layer_paths(ctx, cache);
    // Anything without the completion marker is a leftover of an interrupted build: never used.
    let _ = std::fs::remove_file(&complete);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_file(releases_record(&dir));
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create cache directory {}", cache.display()))?;
    Ok(partial)
}

/// Moves a finished bootstrap into the cache; the marker is written last.
pub fn commit_layer(ctx: &Context, cache: &Path, partial: &Path) -> anyhow::Result<PathBuf> {
    let (dir, complete, _) = layer_paths(ctx, cache);
    std::fs::rename(partial, &dir)?;
    seal_layer(&dir, &complete)?;
    Ok(dir)
}
