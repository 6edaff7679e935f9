//! `foobar-agent backup` and `restore`: the site's database, dumped online by MariaDB's own `mariadb-dump`
//! (`--single-transaction`: a consistent snapshot without locking writers), compressed, named by time, kept to a
//! count, handed to an optional hook; and loaded back by the `mariadb` client after the file was checked whole.
//! A backup holds the site's tables only: no MariaDB user, password or key of the instance.

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::config::Config;
use crate::db::{self, DatabaseEnv};

/// The first line of every backup of ours; `restore` refuses a file without it.
const HEADER: &str = "-- foobar-agent backup of database";
/// What `mariadb-dump` writes last when it finished; `restore` refuses a file without it (cut short).
const TRAILER: &str = "-- Dump completed";

/// What one `backup` did.
#[derive(Debug)]
pub struct Taken {
    pub path: PathBuf,
    pub bytes: u64,
    pub removed: Vec<PathBuf>,
}

/// How the client tools reach the database of `config`: socket or host and port, user, password (in `MYSQL_PWD`,
/// never on the command line), database name.
struct Connection {
    args: Vec<String>,
    password: Option<String>,
    database: String,
}

fn connection(config: &Config) -> anyhow::Result<Connection> {
    let options = db::connect_options(config)?;
    let env = DatabaseEnv::from_options(&config.database_url, &options);
    if env.name.is_empty() {
        bail!(
            "the database URL `{}` names no database (expected mysql://USER@HOST/DATABASE)",
            config.database_url
        );
    }
    let mut args = vec!["--no-defaults".to_string(), format!("--user={}", env.user)];
    if env.socket.is_empty() {
        args.push(format!("--host={}", options.get_host()));
        args.push(format!("--port={}", options.get_port()));
    } else {
        args.push(format!("--socket={}", env.socket));
    }
    Ok(Connection {
        args,
        password: url_password(&config.database_url),
        database: env.name,
    })
}

/// The password of a `mysql://user:password@host/db` URL, if it has one.
fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let credentials = rest.split_once('@')?.0;
    credentials.split_once(':').map(|(_, p)| p.to_string())
}

/// A client tool of MariaDB's; each caller reads its status and names it in its error.
#[allow(clippy::disallowed_methods)]
fn tool(program: &str, connection: &Connection) -> Command {
    let mut command = Command::new(program);
    command.args(&connection.args);
    match &connection.password {
        Some(password) => command.env("MYSQL_PWD", password),
        None => command.env_remove("MYSQL_PWD"),
    };
    command
}

fn unix_time_name() -> String {
    // UTC to the millisecond, sortable, no separators a file system or a shell minds: 20261129T223500.123Z.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

/// Days since 1970-01-01 to a (year, month, day) of the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Takes one backup into `config.backup_dir`, removes all but the newest `backup_keep`, then runs the hook.
pub fn backup(config: &Config) -> anyhow::Result<Taken> {
    let connection = connection(config)?;
    let dir = &config.backup_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the backup directory {}", dir.display()))?;
    let prefix = format!("foobar-{}-", connection.database);
    let path = dir.join(format!("{prefix}{}.sql.gz", unix_time_name()));
    let partial = path.with_extension("gz.partial");
    let started = Instant::now();
    let written = dump(&connection, &partial);
    let bytes = match written {
        Ok(bytes) => bytes,
        Err(err) => {
            let _ = std::fs::remove_file(&partial);
            return Err(err);
        }
    };
    std::fs::rename(&partial, &path)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), path.display()))?;
    tracing::info!(path = %path.display(), bytes, took = ?started.elapsed(), "backup taken");

    let mut ours: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".sql.gz"))
        })
        .collect();
    ours.sort();
    let excess = ours.len().saturating_sub(config.backup_keep as usize);
    let removed: Vec<PathBuf> = ours.into_iter().take(excess).collect();
    for old in &removed {
        std::fs::remove_file(old).with_context(|| format!("cannot remove the old backup {}", old.display()))?;
    }

    if let Some((program, args)) = config.backup_hook.split_first() {
        #[allow(clippy::disallowed_methods)]
        let status = Command::new(program)
            .args(args)
            .arg(&path)
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("key `backup-hook`: cannot run `{program}`"))?;
        if !status.success() {
            bail!(
                "key `backup-hook`: `{program}` failed ({status}) for {}; the backup is kept",
                path.display()
            );
        }
    }
    Ok(Taken { path, bytes, removed })
}

/// `mariadb-dump` of the database into `partial`, compressed, after our header line; synced to disk.
fn dump(connection: &Connection, partial: &Path) -> anyhow::Result<u64> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut gz = GzEncoder::new(file, flate2::Compression::default());
    writeln!(
        gz,
        "{HEADER} `{}`, taken {} by foobar-agent {}",
        connection.database,
        unix_time_name(),
        crate::VERSION
    )?;
    let mut child = tool("mariadb-dump", connection)
        .args([
            "--single-transaction",
            "--routines",
            "--triggers",
            "--hex-blob",
            "--default-character-set=utf8mb4",
        ])
        .arg(&connection.database)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run mariadb-dump (package mariadb-client)")?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let copied = std::io::copy(&mut out, &mut gz);
    let status = child.wait().context("mariadb-dump")?;
    let errors = errors.join().unwrap_or_default();
    copied.context("cannot write the backup")?;
    if !status.success() {
        bail!("mariadb-dump failed ({status}): {}", errors.trim());
    }
    let file = gz.finish().context("cannot write the backup")?;
    file.sync_all().context("cannot write the backup to disk")?;
    Ok(file.metadata()?.len())
}

/// Reads a backup through: our header first, the dump's completion line last, the compression whole.
fn check(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::new(GzDecoder::new(file));
    let not_ours = || {
        anyhow::anyhow!(
            "{} is not a backup of foobar-agent (expected a .sql.gz that `foobar-agent backup` wrote)",
            path.display()
        )
    };
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() || !first.starts_with(HEADER) {
        return Err(not_ours());
    }
    let mut last = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                if !text.trim().is_empty() {
                    last = text.trim().to_string();
                }
            }
            Err(err) => bail!(
                "{} is truncated or damaged ({err}): nothing was restored",
                path.display()
            ),
        }
    }
    if !last.starts_with(TRAILER) {
        bail!(
            "{} is truncated: its dump does not end with `{TRAILER}`; nothing was restored",
            path.display()
        );
    }
    Ok(())
}

/// Checks `path` whole, then loads it into the database of `config` with the `mariadb` client.
pub fn restore(config: &Config, path: &Path) -> anyhow::Result<()> {
    check(path)?;
    let connection = connection(config)?;
    let mut child = tool("mariadb", &connection)
        .arg(&connection.database)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run the mariadb client (package mariadb-client)")?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let copied = std::io::copy(&mut GzDecoder::new(file), &mut stdin);
    drop(stdin);
    let out = child.wait_with_output().context("mariadb")?;
    if !out.status.success() {
        bail!(
            "the mariadb client failed restoring {} ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    copied.with_context(|| format!("cannot read {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_become_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_786), (2026, 11, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn a_password_comes_from_the_url_only_when_there_is_one() {
        assert_eq!(
            url_password("mysql://u:secret@localhost/db"),
            Some("secret".to_string())
        );
        assert_eq!(url_password("mysql://u@localhost/db?socket=/x"), None);
    }
}
