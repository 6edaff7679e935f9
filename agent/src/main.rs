//! The `foobar-agent` command line: parses flags and dispatches.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use foobar_agent::config::{Config, Listen};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "foobar-agent", version = foobar_agent::VERSION, about = "Application server of the foobar image")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// Configuration file [default: /etc/foobar/agent.toml, skipped when absent]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Database URL, overriding `database-url` in the file
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

/// Where `instance-config` and `report` find the platform and the instance's files.
#[derive(clap::Args)]
struct PlatformArgs {
    /// Work under this directory instead of / (instance-config changes /etc/hostname, /etc/hosts, the admin's
    /// authorized keys, the nginx site, /etc/foobar/site.env and the TLS files there; report reads first boot's record)
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Send every metadata request to URL instead of the platform's own address (also Azure's wire server)
    #[arg(long, value_name = "URL")]
    metadata_url: Option<String>,
    /// Read the DMI strings from DIR
    #[arg(long, value_name = "DIR", default_value = "/sys/class/dmi/id")]
    dmi_dir: PathBuf,
}

impl PlatformArgs {
    fn sources(self, seed_dir: Option<PathBuf>) -> foobar_agent::metadata::Sources {
        foobar_agent::metadata::Sources {
            root: self.root,
            dmi_dir: self.dmi_dir,
            seed_dir,
            metadata_url: self.metadata_url,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP; migrations are applied in the background before the agent reports ready
    Serve {
        #[command(flatten)]
        common: Common,
        /// Where to listen, `host:port` or `unix:/path`, overriding `listen` in the file
        #[arg(long, value_name = "ADDR", value_parser = Listen::parse)]
        listen: Option<Listen>,
    },
    /// Run the site's own app server (the `[app]` table) in a unit of its own: apply its migrations, start it,
    /// restart it when it dies or hangs, stop it gracefully on SIGTERM, and report its state to `app.status-file`
    /// for the agent's `/readyz` and `/healthz`
    App {
        /// Configuration file [default: /etc/foobar/agent.toml, skipped when absent]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The app's database URL, overriding `app.database-url` in the file
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
    },
    /// Take a backup of the site's database now (mariadb-dump --single-transaction, gzip) into `backup-dir`, named
    /// by time; keep the newest `backup-keep`; then run `backup-hook` with its path
    Backup {
        #[command(flatten)]
        common: Common,
        /// Write into DIR instead of `backup-dir`
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Load a backup of `foobar-agent backup` into the site's database (its tables are replaced); refuses a file that
    /// is not one of ours or is cut short, before changing anything
    Restore {
        #[command(flatten)]
        common: Common,
        /// The backup (.sql.gz)
        file: PathBuf,
    },
    /// Apply pending migrations once and exit; non-zero with the reason when they cannot be applied
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// Read this instance's hostname, SSH keys and site names from the platform's metadata and apply them (first
    /// boot, as root); the platform is told by DMI, so elsewhere it returns at once
    InstanceConfig {
        #[command(flatten)]
        platform: PlatformArgs,
        /// Read a NoCloud seed (meta-data, user-data) from DIR instead of mounting the `cidata` volume
        #[arg(long, value_name = "DIR")]
        seed_dir: Option<PathBuf>,
    },
    /// Print the full /healthz document (the database, migrations, first boot and the app's last output), asked of
    /// the agent directly on its socket; exits 0 when healthy. Through nginx, only clients on the machine get it all
    Health {
        #[command(flatten)]
        common: Common,
        /// Where the agent listens, `host:port` or `unix:/path`, overriding `listen` in the file
        #[arg(long, value_name = "ADDR", value_parser = Listen::parse)]
        listen: Option<Listen>,
    },
    /// Get the site's certificate from the ACME CA of `[acme]` (uacme, HTTP-01 through nginx), install it and reload
    /// nginx; renew it when fewer than `renew-days` are left. Retries with backoff until one is in place; nothing
    /// when ACME is off
    Acme {
        /// Work under this directory instead of / (site.env, the account, the certificate; nginx is not reloaded)
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// One attempt: exit non-zero when it fails instead of trying again
        #[arg(long)]
        once: bool,
        /// uacme's challenge hook
        #[arg(long, value_name = "PROGRAM", default_value = foobar_agent::acme::HOOK)]
        hook: PathBuf,
    },
    /// Turn on this machine's roles (first boot, as root, after instance-config): find it in the cluster description
    /// (by the name the instance configuration gave, else its hostname), write the engines' settings (Galera,
    /// HAProxy, keepalived) and the firewall for its roles, and mark the services it runs (/etc/foobar/active)
    Node {
        /// The root file system to write under
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// Before MariaDB starts on a db node: start a new Galera cluster or join one (Galera's own state files decide;
    /// see `galera.rs`), written to /run/foobar-galera.env for MariaDB's unit
    GaleraStart {
        /// MariaDB's data directory
        #[arg(long, value_name = "DIR", default_value = "/var/lib/mysql")]
        datadir: PathBuf,
    },
    /// Answer HTTP on the socket systemd passes (or --listen) with 200 when this Galera node is Synced in the primary
    /// component, 503 otherwise: the app nodes' HAProxy check (foobar-galera-check.socket, port 9200)
    GaleraCheck {
        /// Where to listen when systemd passes no socket
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9200")]
        listen: String,
        /// MariaDB to ask
        #[arg(long, value_name = "URL", default_value = foobar_agent::galera::CHECK_DATABASE_URL)]
        database_url: String,
    },
    /// Tell the platform how provisioning went (Azure's health report: Ready, or NotReady with first boot's error;
    /// nothing elsewhere). Run on every boot after first boot; retried for up to 20 minutes
    Report {
        #[command(flatten)]
        platform: PlatformArgs,
        /// Give up after this many seconds
        #[arg(long, value_name = "SECONDS", default_value_t = foobar_agent::metadata::REPORT_BUDGET.as_secs())]
        timeout: u64,
    },
}

fn load(common: &Common) -> anyhow::Result<Config> {
    let mut config = Config::load(common.config.as_deref())?;
    if let Some(url) = &common.database_url {
        config.database_url = url.clone();
    }
    Ok(config)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { common, listen } => {
            let mut config = load(&common)?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            foobar_agent::serve::run(config).await
        }
        Command::Node { root } => {
            let env = foobar_agent::metadata::read_site_env(&root).unwrap_or_default();
            let host = foobar_agent::cluster::Host {
                canonical: foobar_agent::metadata::site_env_value(&env, "CANONICAL")
                    .unwrap_or_else(|| "localhost".into()),
            };
            let hostname = std::fs::read_to_string(root.join("etc/hostname")).unwrap_or_default();
            let placement = foobar_agent::cluster::activate(&root, hostname.trim(), &host)?;
            let roles: Vec<&str> = placement.roles.iter().map(|r| r.name()).collect();
            match &placement.node {
                Some(node) => println!(
                    "node {} ({}) of the cluster: roles {}",
                    node.name,
                    node.address,
                    roles.join(", ")
                ),
                None => println!("not a node of a cluster description: roles {}", roles.join(", ")),
            }
            Ok(())
        }
        Command::GaleraCheck { listen, database_url } => {
            let listener = match foobar_agent::systemd::take_listener() {
                Some(foobar_agent::systemd::Inherited::Tcp(l)) => l,
                Some(foobar_agent::systemd::Inherited::Unix(_)) => {
                    anyhow::bail!("galera-check: systemd passed a unix socket; expected TCP")
                }
                None => std::net::TcpListener::bind(&listen)
                    .with_context(|| format!("galera-check: cannot listen on {listen}"))?,
            };
            foobar_agent::galera::check_server(listener, &database_url, foobar_agent::galera::DRAIN).await
        }
        Command::GaleraStart { datadir } => {
            match foobar_agent::galera::run(Path::new("/"), &datadir)? {
                foobar_agent::galera::Start::NewCluster(why) => println!("galera: new cluster: {why}"),
                foobar_agent::galera::Start::Join(why) => println!("galera: {why}"),
            }
            Ok(())
        }
        Command::InstanceConfig { platform, seed_dir } => {
            let sources = platform.sources(seed_dir);
            let root = sources.root.clone();
            let started = std::time::Instant::now();
            let probe_sources = sources.clone();
            let applied_root = root.clone();
            let result = tokio::task::spawn_blocking(move || {
                let mut config = foobar_agent::metadata::fetch(&sources)?;
                let applied = foobar_agent::metadata::apply(&mut config, &applied_root);
                for note in &config.notes {
                    eprintln!("foobar-agent: note: {note}");
                }
                applied?;
                Ok::<_, anyhow::Error>(config)
            })
            .await?;
            let config = match result {
                Ok(config) => config,
                Err(err) => {
                    // Kept for the platform's report (NotReady with the reason); the image's settings stay.
                    let platform = foobar_agent::metadata::detect(&probe_sources)
                        .map_or(foobar_agent::metadata::Platform::None, |s| s.platform());
                    foobar_agent::metadata::record_failure(&root, platform, &format!("{err:#}"))?;
                    // Asked again on the next boots until the platform answers once (foobar-instance-config.service).
                    foobar_agent::metadata::set_pending(&root, Some(&format!("{err:#}")))?;
                    return Err(err);
                }
            };
            foobar_agent::metadata::set_pending(&root, None)?;
            println!(
                "platform {}: hostname {}, {} SSH key(s), site {}, {} note(s) ({:.2} s)",
                serde_json::to_value(config.platform)?.as_str().unwrap_or("?"),
                config.hostname.as_deref().unwrap_or("unchanged"),
                config.ssh_keys.len(),
                match &config.site {
                    Some(site) => format!(
                        "renamed to {} / {}",
                        site.canonical.as_deref().unwrap_or("(same)"),
                        site.domain.as_deref().unwrap_or("(same)")
                    ),
                    None => "unchanged".to_string(),
                },
                config.notes.len(),
                started.elapsed().as_secs_f64()
            );
            // Every valid part is applied; each invalid one is named, and the command fails (recorded for the report).
            for error in &config.errors {
                eprintln!("foobar-agent: error: {error}");
            }
            if !config.errors.is_empty() {
                anyhow::bail!(
                    "{} part(s) of the instance configuration are invalid and were skipped; the rest is applied",
                    config.errors.len()
                );
            }
            Ok(())
        }
        Command::Acme { root, once, hook } => {
            let reload = root == std::path::Path::new("/");
            let run = foobar_agent::acme::Run {
                root,
                hook,
                once,
                reload,
            };
            tokio::task::spawn_blocking(move || foobar_agent::acme::run(&run)).await??;
            Ok(())
        }
        Command::Report { platform, timeout } => {
            let sources = platform.sources(None);
            let budget = std::time::Duration::from_secs(timeout);
            match tokio::task::spawn_blocking(move || foobar_agent::metadata::report(&sources, budget)).await?? {
                Some((platform, said)) => println!(
                    "platform {}: reported {said}",
                    serde_json::to_value(platform)?.as_str().unwrap_or("?")
                ),
                None => println!("nothing to report: the platform waits for no report"),
            }
            Ok(())
        }
        Command::Health { common, listen } => {
            let config = load(&common)?;
            let listen = listen.unwrap_or(config.listen);
            let (status, body) = tokio::task::spawn_blocking(move || ask_health(&listen)).await??;
            println!("{body}");
            if status != 200 {
                anyhow::bail!("/healthz answered {status}: not healthy");
            }
            Ok(())
        }
        Command::App { config, database_url } => {
            foobar_agent::supervisor::run(Config::load(config.as_deref())?, database_url).await
        }
        Command::Backup { common, dir } => {
            let mut config = load(&common)?;
            if let Some(dir) = dir {
                config.backup_dir = dir;
            }
            let taken = foobar_agent::backup::backup(&config)?;
            println!(
                "backup {} ({} bytes); removed {} older one(s), keeping {}",
                taken.path.display(),
                taken.bytes,
                taken.removed.len(),
                config.backup_keep
            );
            Ok(())
        }
        Command::Restore { common, file } => {
            foobar_agent::backup::restore(&load(&common)?, &file)?;
            println!("restored {}", file.display());
            Ok(())
        }
        Command::Migrate { common } => {
            let applied = foobar_agent::serve::migrate_once(load(&common)?).await?;
            println!(
                "applied {} migration(s); schema version {}",
                applied.newly_applied, applied.version
            );
            if !applied.unknown.is_empty() {
                println!(
                    "the database also has migration(s) {:?} applied, which this build does not know (a newer build's)",
                    applied.unknown
                );
            }
            Ok(())
        }
    }
}

/// `GET /healthz` straight to the agent (HTTP/1.0, one request): its status and body.
fn ask_health(listen: &Listen) -> anyhow::Result<(u16, String)> {
    use anyhow::Context as _;
    const REQUEST: &[u8] = b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n";
    fn exchange(mut stream: impl std::io::Read + std::io::Write) -> std::io::Result<Vec<u8>> {
        let mut answer = Vec::new();
        stream.write_all(REQUEST)?;
        stream.read_to_end(&mut answer)?;
        Ok(answer)
    }
    let timeout = Some(std::time::Duration::from_secs(10));
    let answer = match listen {
        Listen::Unix(path) => {
            let stream = std::os::unix::net::UnixStream::connect(path)
                .with_context(|| format!("cannot connect to the agent at {}", path.display()))?;
            stream.set_read_timeout(timeout)?;
            exchange(stream)?
        }
        Listen::Tcp(address) => {
            let stream = std::net::TcpStream::connect(address)
                .with_context(|| format!("cannot connect to the agent at {address}"))?;
            stream.set_read_timeout(timeout)?;
            exchange(stream)?
        }
    };
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the agent's answer has no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the agent's answer has no status")?;
    Ok((status, body.to_string()))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("foobar-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
