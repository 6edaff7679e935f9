//! The one way to run an external command: stdin closed, `LANG=C.UTF-8`, logged at debug, stderr kept, and on
//! failure an error carrying the command line, the exit status and the tail of stderr.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// Lines of stderr kept for the error message.
const TAIL: usize = 25;

pub struct Cmd {
    inner: Command,
    line: String,
    /// Show stderr lines as progress while the command runs.
    progress: bool,
}

pub fn cmd(program: impl AsRef<OsStr>) -> Cmd {
    let mut inner = Command::new(&program);
    inner
        .stdin(Stdio::null())
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8");
    Cmd {
        inner,
        line: program.as_ref().to_string_lossy().into_owned(),
        progress: false,
    }
}

impl Cmd {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.line.push(' ');
        self.line.push_str(&arg.as_ref().to_string_lossy());
        self.inner.arg(arg);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cmd {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Cmd {
        self.inner.env(key, value);
        self
    }

    /// Relays the command's stderr as progress lines (for long steps such as mmdebstrap).
    pub fn progress(mut self) -> Cmd {
        self.progress = true;
        self
    }

    /// Runs to completion and returns stdout.
    pub fn output(mut self) -> anyhow::Result<Vec<u8>> {
        tracing::debug!(command = %self.line, "running");
        let mut child = self
            .inner
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.line))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let progress = self.progress;
        let reader = std::thread::spawn(move || {
            let mut tail = VecDeque::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if progress {
                    tracing::info!("  {line}");
                }
                if tail.len() == TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            tail
        });
        let mut stdout = Vec::new();
        std::io::Read::read_to_end(child.stdout.as_mut().expect("piped stdout"), &mut stdout)?;
        let status = child.wait()?;
        let tail = reader.join().unwrap_or_default();
        if !status.success() {
            let tail: Vec<String> = tail.into();
            bail!("command failed ({status}): {}\n{}", self.line, tail.join("\n"));
        }
        Ok(stdout)
    }

    /// Replaces this process with the command (for QEMU: signals and exit status are then QEMU's own).
    pub fn exec(mut self) -> anyhow::Error {
        use std::os::unix::process::CommandExt as _;
        tracing::debug!(command = %self.line, "exec");
        let err = self.inner.exec();
        anyhow::Error::new(err).context(format!("cannot start `{}`", self.line))
    }

    /// Starts the command in a session of its own, its output appended to `log`, and leaves it running; its pid.
    pub fn spawn_detached(mut self, log: &Path) -> anyhow::Result<u32> {
        use std::os::unix::process::CommandExt as _;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = self
            .inner
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.line))?;
        Ok(child.id())
    }

    /// Runs to completion and returns stdout, whatever the exit status (a probe whose failure is an answer).
    pub fn output_lossy(mut self) -> Vec<u8> {
        self.inner
            .stderr(Stdio::null())
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default()
    }

    pub fn run(self) -> anyhow::Result<()> {
        self.output().map(|_| ())
    }
}

/// A host tool and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Fails with one message listing every missing tool or file and the packages to install.
pub fn require(tools: &[Tool], files: &[(&Path, &'static str)]) -> anyhow::Result<()> {
    let mut missing: Vec<String> = Vec::new();
    let mut packages: Vec<&str> = Vec::new();
    for t in tools {
        if find_in_path(t.program).is_none() {
            missing.push(t.program.to_string());
            packages.push(t.package);
        }
    }
    for (file, package) in files {
        if !file.exists() {
            missing.push(file.display().to_string());
            packages.push(package);
        }
    }
    if !missing.is_empty() {
        packages.sort();
        packages.dedup();
        bail!(
            "missing host tools: {}; install them with: apt-get install {} (or run `just deps`)",
            missing.join(", "),
            packages.join(" ")
        );
    }
    Ok(())
}
