//! Records the source commit the agent is built from, so `/healthz`'s `version` tells which build answered
//! (`0.1.0+1a2b3c4d5e6f`; just the package version outside a git checkout).

use std::process::Command;

fn main() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // A new commit moves HEAD's branch ref (or HEAD itself, detached).
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        println!("cargo:rerun-if-changed={}", repo.join(path).display());
    }
    #[allow(clippy::disallowed_methods)] // a build script has no process helper of the agent's to use
    let commit = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_hexdigit()));
    let version = match commit {
        Some(commit) => format!("{}+{commit}", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_string(),
    };
    println!("cargo:rustc-env=FOOBAR_BUILD_VERSION={version}");
}
