//! The README documents every config key and every command-line flag.

use crate::support::agent_command;

fn readme() -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// Flags as `--help` lists them, so a new flag without documentation fails here.
fn flags(help: &str) -> Vec<String> {
    help.split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches([',', '.', ')'])
                .split('=')
                .next()
                .unwrap()
                .to_string()
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

#[test]
fn every_agent_flag_is_in_the_readme() {
    let readme = readme();
    for sub in ["serve", "migrate", "health", "instance-config", "report"] {
        let (code, help, _) = agent_command(&[sub, "--help"]);
        assert_eq!(code, 0);
        let flags = flags(&help);
        assert!(!flags.is_empty(), "no flags found in `{sub} --help`");
        for flag in flags {
            assert!(
                readme.contains(&format!("`{flag}")),
                "README does not document `foobar-agent {sub} {flag}`"
            );
        }
    }
}

#[test]
fn every_agent_config_key_is_in_the_readme() {
    // The agent's own error for an unknown key lists every key it accepts at that level.
    let dir = crate::support::temp_dir("keys");
    let file = dir.join("agent.toml");
    let readme = readme();
    for (text, prefix) in [("no-such-key = 1\n", ""), ("[app]\nno-such-key = 1\n", "app.")] {
        std::fs::write(&file, text).unwrap();
        let (_, _, stderr) = agent_command(&["migrate", "--config", file.to_str().unwrap()]);
        let expected = stderr
            .split("expected one of")
            .nth(1)
            .unwrap_or_else(|| panic!("no key list in: {stderr}"));
        let keys: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        assert!(keys.len() >= 5, "{stderr}");
        for key in keys {
            assert!(
                readme.contains(&format!("`{prefix}{key}`")),
                "README does not document agent config key `{prefix}{key}`"
            );
        }
    }
}

#[test]
fn every_imagebuild_flag_is_in_the_readme() {
    let readme = readme();
    for args in [
        &["--help"][..],
        &["boot", "--help"][..],
        &["smoke", "--help"][..],
        &["verify", "--help"][..],
    ] {
        let out = std::process::Command::new(crate::support::binary("imagebuild"))
            .args(args)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        let flags = flags(&help);
        assert!(!flags.is_empty(), "no flags in `imagebuild {args:?}`");
        for flag in flags {
            assert!(
                readme.contains(&format!("`{flag}")),
                "README does not document imagebuild flag `{flag}`"
            );
        }
    }
}

#[test]
fn every_image_config_key_is_in_the_readme() {
    let readme = readme();
    let dir = crate::support::temp_dir("imgkeys");
    let file = dir.join("c.toml");
    // imagebuild's error for an unknown key lists the keys accepted at that level.
    // `None` when `prefix` is not a table but a top-level value (`role`).
    let keys_at = |prefix: &str| -> Option<Vec<String>> {
        let text = if prefix.is_empty() {
            "bogus = 1\n".to_string()
        } else {
            format!("[{prefix}]\nbogus = 1\n")
        };
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(crate::support::binary("imagebuild"))
            .args(["--out", "/tmp/never.qcow2", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // serde says "expected one of `a`, `b`", "expected `a` or `b`" or "expected `a`".
        let Some(list) = stderr.split("unknown field `bogus`, expected").nth(1) else {
            assert!(
                !prefix.is_empty() && stderr.contains("invalid type: map"),
                "no key list: {stderr}"
            );
            return None;
        };
        Some(list.split('`').skip(1).step_by(2).map(String::from).collect())
    };
    let sections = keys_at("").expect("top-level keys");
    assert!(sections.len() >= 4, "{sections:?}");
    for section in sections {
        let Some(keys) = keys_at(&section) else {
            assert!(
                readme.contains(&format!("`{section}`")),
                "README does not document image config key `{section}`"
            );
            continue;
        };
        for key in keys {
            let full = format!("{section}.{key}");
            assert!(
                readme.contains(&format!("`{full}`")),
                "README does not document image config key `{full}`"
            );
        }
    }
}
