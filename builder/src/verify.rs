//! `imagebuild verify IMAGE`: recomputes the image's sha256 and compares it with what its manifest recorded.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::util::sha256_file;

/// What a successful check found.
pub struct Verified {
    pub manifest: PathBuf,
    pub format: String,
    pub sha256: String,
    pub seed: String,
}

/// `IMAGE.manifest.json`, else a manifest beside it that lists IMAGE (an extra format of the same build).
fn find_manifest(image: &Path) -> PathBuf {
    let mut own = image.as_os_str().to_owned();
    own.push(".manifest.json");
    let own = PathBuf::from(own);
    if own.exists() {
        return own;
    }
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = image
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .collect();
    candidates.sort();
    candidates
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|doc| doc["outputs"].as_array().cloned())
                .is_some_and(|outputs| {
                    outputs.iter().any(|o| {
                        o["path"]
                            .as_str()
                            .and_then(|p| Path::new(p).file_name())
                            .map(|n| n.to_string_lossy().into_owned())
                            == Some(name.clone())
                    })
                })
        })
        .unwrap_or(own)
}

/// Checks IMAGE against its manifest: `IMAGE.manifest.json`, or the manifest beside it that lists it, or `manifest`.
pub fn verify(image: &Path, manifest: Option<&Path>) -> anyhow::Result<Verified> {
    let manifest = match manifest {
        Some(m) => m.to_path_buf(),
        None => find_manifest(image),
    };
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "cannot read the manifest {} (pass --manifest FILE to name the build's manifest)",
            manifest.display()
        )
    })?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not a manifest (not JSON)", manifest.display()))?;
    let file_name = image
        .file_name()
        .with_context(|| format!("{} names no file", image.display()))?;
    let outputs = doc["outputs"]
        .as_array()
        .with_context(|| format!("{} has no `outputs` list", manifest.display()))?;
    let entry = outputs
        .iter()
        .find(|o| o["path"].as_str().and_then(|p| Path::new(p).file_name()) == Some(file_name))
        .with_context(|| {
            format!(
                "{} lists no output named {}",
                manifest.display(),
                file_name.to_string_lossy()
            )
        })?;
    let recorded = entry["sha256"].as_str().unwrap_or_default().to_string();
    let bytes = std::fs::metadata(image)
        .with_context(|| format!("cannot read {}", image.display()))?
        .len();
    let actual = sha256_file(image)?;
    if actual != recorded {
        bail!(
            "{} does not match its manifest: sha256 {actual} ({bytes} bytes), the manifest {} recorded {recorded} ({} bytes); \
             the image was changed or damaged after the build",
            image.display(),
            manifest.display(),
            entry["bytes"]
        );
    }
    Ok(Verified {
        manifest,
        format: entry["format"].as_str().unwrap_or("?").to_string(),
        sha256: actual,
        seed: doc["seed"].as_str().unwrap_or_default().to_string(),
    })
}
