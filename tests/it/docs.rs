//! The README documents every config key and every command-line flag.

use crate::support::agent_command;

fn readme() -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// Flags as `--help` lists them, so a new flag without documentation fails here.
fn flags(help: &str) -> Vec<String> {
    help.split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.']).split('=').next().unwrap().to_string())
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

#[test]
fn every_agent_flag_is_in_the_readme() {
    let readme = readme();
    for sub in ["serve", "migrate"] {
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
    // The agent's own error for an unknown key lists every key it accepts.
    let dir = crate::support::temp_dir("keys");
    let file = dir.join("agent.toml");
    std::fs::write(&file, "no-such-key = 1\n").unwrap();
    let (_, _, stderr) = agent_command(&["migrate", "--config", file.to_str().unwrap()]);
    let expected = stderr
        .split("expected one of")
        .nth(1)
        .unwrap_or_else(|| panic!("no key list in: {stderr}"));
    let keys: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    assert!(keys.len() >= 5, "{stderr}");
    let readme = readme();
    for key in keys {
        assert!(
            readme.contains(&format!("`{key}`")),
            "README does not document agent config key `{key}`"
        );
    }
}
