//! `imagebuild`: parses the command line and dispatches to the build or to `boot`.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use foobar_builder::process::{require, Tool};
use foobar_builder::{boot, build, plan, smoke};

#[derive(Parser)]
#[command(
    name = "imagebuild",
    version,
    about = "Builds the foobar machine image: imagebuild --out foobar.qcow2",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    build: BuildArgs,
}

#[derive(clap::Args)]
struct BuildArgs {
    /// Output image; its extension picks the format unless --format is given
    #[arg(long, value_name = "PATH", required = true)]
    out: Option<PathBuf>,
    /// Image configuration [default: the built-in image/foobar.toml]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Output format: qcow2, raw, vmdk, vhd; repeat for several (the first goes to --out)
    #[arg(long, value_name = "F")]
    format: Vec<String>,
    /// An OpenSSH public key file for the admin user; repeatable
    #[arg(long = "ssh-key", value_name = "PUBKEY_FILE")]
    ssh_key: Vec<PathBuf>,
    /// The foobar-agent binary to install [default: foobar-agent beside imagebuild]
    #[arg(long, value_name = "FILE")]
    agent_bin: Option<PathBuf>,
    /// Where the package layer is cached [default: $XDG_CACHE_HOME/foobar or ~/.cache/foobar]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Build the package layer afresh and do not cache it
    #[arg(long)]
    no_cache: bool,
    /// Timestamp for everything in the image [default: $SOURCE_DATE_EPOCH, else the last commit's time]
    #[arg(long, value_name = "SECONDS")]
    source_date_epoch: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Boot an image in QEMU with user networking and print its URLs
    Boot {
        /// The image to boot (qcow2, raw, vmdk or vhd)
        image: PathBuf,
        /// Host port N forwards to guest 80, N+1 to 443, N+2 to 22
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Boot with UEFI firmware (OVMF) instead of SeaBIOS
        #[arg(long)]
        uefi: bool,
        /// Write to the image itself instead of a throwaway overlay
        #[arg(long)]
        write: bool,
        /// Guest memory in MiB
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Send the serial console to FILE instead of this terminal
        #[arg(long, value_name = "FILE")]
        serial: Option<PathBuf>,
        /// Open QEMU's monitor on a unix socket (for `system_powerdown`)
        #[arg(long, value_name = "SOCKET")]
        monitor: Option<PathBuf>,
        /// Also forward host port HOST to guest port GUEST; repeatable
        #[arg(long, value_name = "HOST:GUEST", value_parser = boot::parse_forward)]
        forward: Vec<(u16, u16)>,
        /// Give the guest the SMBIOS strings of this cloud (ec2, gce, azure)
        #[arg(long, value_enum)]
        platform: Option<boot::Platform>,
        /// A metadata service on host port PORT, which the guest's agent asks instead of the cloud's
        #[arg(long, value_name = "PORT")]
        metadata: Option<u16>,
        /// Attach IMAGE (a `cidata`-labelled NoCloud seed) read-only as a second disk
        #[arg(long, value_name = "IMAGE")]
        seed: Option<PathBuf>,
        /// Attach FILE as the data disk (serial foobar-data; MariaDB's data lives there); made if missing
        #[arg(long, value_name = "FILE")]
        data_disk: Option<PathBuf>,
        /// The size of a data disk made by --data-disk, in MiB
        #[arg(long, value_name = "MIB", default_value_t = 2048)]
        data_disk_size: u64,
    },
    /// Run the smoke checks against a running instance over HTTP and HTTPS
    Smoke(SmokeArgs),
    /// A cluster on this machine: every node of a description in QEMU on one private network (as root)
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Check that an image is byte for byte what its build's manifest recorded
    Verify {
        /// The image to check
        image: PathBuf,
        /// The manifest to check against [default: IMAGE.manifest.json]
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Boot every node of the description FILE, one after another, in a network namespace of its own; print where
    /// the site answers on this machine
    Up {
        /// The cluster description (cluster.toml)
        file: PathBuf,
        /// The image every node boots (built with a config whose `cluster` is FILE)
        #[arg(long, value_name = "IMAGE")]
        image: PathBuf,
        /// The site answers on 127.0.0.1:PORT (HTTP) and PORT+1 (HTTPS)
        #[arg(long, default_value_t = 8480)]
        port: u16,
        /// Memory of each node, MiB
        #[arg(long, default_value_t = 768)]
        memory: u32,
        /// Seconds each node may take to finish its first boot
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Make NODE ready but do not boot it (repeatable): `imagebuild cluster start NODE` adds it later
        #[arg(long, value_name = "NODE")]
        hold: Vec<String>,
        /// Where the cluster's state, consoles and seeds are kept
        #[arg(long, value_name = "DIR", default_value = foobar_builder::cluster::DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Each node's roles, whether it runs, its /readyz (app) and Galera state (db), and the site's /readyz
    Status {
        /// The same as a JSON document (also each node's address, QEMU pid and monitor socket)
        #[arg(long)]
        json: bool,
        /// The Host sent with the health requests
        #[arg(long, default_value = "www.foobar.com")]
        host: String,
        #[arg(long, value_name = "DIR", default_value = foobar_builder::cluster::DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Boot a node of the cluster again from its own disk (after `stop`, or a power cut)
    Start {
        node: String,
        #[arg(long, value_name = "DIR", default_value = foobar_builder::cluster::DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Stop a node: its ACPI power button (a clean shutdown), or --power-cut (QEMU killed)
    Stop {
        node: String,
        #[arg(long)]
        power_cut: bool,
        #[arg(long, value_name = "DIR", default_value = foobar_builder::cluster::DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Move the app nodes to a new image one at a time, without a failed request: a free app slot boots the new
    /// image; once it is ready and passes the read-only smoke checks, an old node drains and stops; repeat. With
    /// --role db, the db nodes in place, one at a time, each on its own data disk: stop, boot the new image, wait
    /// until it is Synced again
    Rollout {
        /// The new image (built with the same cluster description)
        #[arg(long, value_name = "IMAGE")]
        image: PathBuf,
        /// Which nodes: app or db
        #[arg(long, default_value = "app", value_parser = ["app", "db"])]
        role: String,
        /// Seconds each new node may take to be ready and pass the smoke checks (db: to be Synced); past it the
        /// rollout stops
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// The site's canonical name, sent as Host with the health requests and the smoke checks
        #[arg(long, default_value = "www.foobar.com")]
        host: String,
        #[arg(long, value_name = "DIR", default_value = foobar_builder::cluster::DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Stop every node and helper of the cluster and remove its network namespace
    Down {
        #[arg(long, value_name = "DIR", default_value = foobar_builder::cluster::DEFAULT_STATE)]
        state: PathBuf,
    },
}

#[derive(clap::Args)]
struct SmokeArgs {
    /// Where the instance answers: http://ADDRESS[:PORT] or https://NAME (no path)
    url: String,
    /// The site's canonical name to ask for [default: the URL's name, or www.foobar.com for an address]
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Connect to IP whenever NAME is asked for, instead of resolving it; repeatable
    #[arg(long, value_name = "NAME:IP", value_parser = parse_resolve)]
    resolve: Vec<(String, IpAddr)>,
    /// Port for the HTTPS checks [default: 443; the URL's port + 1 for plain HTTP on another port]
    #[arg(long, value_name = "N")]
    https_port: Option<u16>,
    /// Accept a certificate no trusted authority signed (it must still name the site)
    #[arg(long)]
    insecure: bool,
    /// Seconds each request may take
    #[arg(long, value_name = "S", default_value_t = 10)]
    timeout: u64,
    /// First wait up to S seconds for /readyz to answer 200, and report how long it took
    #[arg(long, value_name = "S")]
    wait: Option<u64>,
    /// Skip the checks that write (for production sites)
    #[arg(long)]
    read_only: bool,
    /// Resolve names by asking this DNS server (IP[:PORT], port 53 by default) instead of the system's resolver
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_dns_server)]
    dns_server: Option<std::net::SocketAddr>,
    /// Output: one line per check, or a JSON or JUnit XML document on stdout
    #[arg(long, value_enum, default_value = "text")]
    format: smoke::report::Format,
}

fn parse_resolve(text: &str) -> Result<(String, IpAddr), String> {
    let (name, ip) = text
        .split_once(':')
        .ok_or_else(|| format!("expected NAME:IP, got `{text}`"))?;
    let ip = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("`{ip}` is not an IP address (expected NAME:IP)"))?;
    Ok((name.to_string(), ip))
}

fn parse_dns_server(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(ip) = text.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    text.parse()
        .map_err(|_| format!("expected IP or IP:PORT (like 127.0.0.1:5353 or [::1]:53), got `{text}`"))
}

fn smoke(args: SmokeArgs) -> anyhow::Result<bool> {
    use smoke::report::{self, Format};
    let options = smoke::Options {
        url: args.url,
        host: args.host,
        resolve: args.resolve,
        https_port: args.https_port,
        insecure: args.insecure,
        timeout: Duration::from_secs(args.timeout.max(1)),
        wait: args.wait.map(Duration::from_secs),
        read_only: args.read_only,
        dns_server: args.dns_server,
    };
    // Output errors (a closed pipe) are ignored: the exit status still tells the result.
    let mut out = std::io::stdout();
    let text = args.format == Format::Text;
    let report = smoke::run(&options, |result| {
        if text {
            let _ = writeln!(out, "{}", report::line(result));
        }
    })?;
    let _ = match args.format {
        Format::Text => writeln!(out, "{}", report::summary(&report)),
        Format::Json => writeln!(out, "{}", report::json(&report)),
        Format::Junit => write!(out, "{}", report::junit(&report)),
    };
    Ok(report.ok())
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let ctx = plan::plan(
        plan::Flags {
            out: args.out.expect("clap requires --out"),
            config: args.config,
            formats: args.format,
            ssh_keys: args.ssh_key,
            agent_bin: args.agent_bin,
            cache_dir: args.cache_dir,
            no_cache: args.no_cache,
            source_date_epoch: args.source_date_epoch,
        },
        build::STAGE_TOOLS,
    )?;
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))?;
    }
    build::build_image(&ctx, interrupted)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Boot {
            image,
            port,
            uefi,
            write,
            memory,
            serial,
            monitor,
            forward,
            platform,
            metadata,
            seed,
            data_disk,
            data_disk_size,
        }) => require(
            &[Tool {
                program: "qemu-system-x86_64",
                package: "qemu-system-x86",
            }],
            &[],
        )
        .and_then(|_| {
            boot::boot(&boot::BootPlan {
                image,
                port,
                uefi,
                write,
                memory_mib: memory,
                serial,
                monitor,
                forwards: forward,
                platform,
                metadata,
                seed,
                data_disk,
                data_disk_size_mib: data_disk_size,
                tap: None,
            })
        }),
        Some(Command::Cluster(command)) => run_cluster(command),
        Some(Command::Verify { image, manifest }) => {
            foobar_builder::verify::verify(&image, manifest.as_deref()).map(|v| {
                println!(
                    "{}: ok, sha256 {} matches {} ({}, seed {})",
                    image.display(),
                    v.sha256,
                    v.manifest.display(),
                    v.format,
                    v.seed
                );
            })
        }
        Some(Command::Smoke(args)) => match smoke(args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(err) => Err(err),
        },
        None => build(cli.build),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("imagebuild: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_cluster(command: ClusterCommand) -> anyhow::Result<()> {
    use foobar_builder::cluster;
    match command {
        ClusterCommand::Up {
            file,
            image,
            port,
            memory,
            timeout,
            hold,
            state,
        } => {
            require(
                &[
                    Tool {
                        program: "qemu-system-x86_64",
                        package: "qemu-system-x86",
                    },
                    Tool {
                        program: "ip",
                        package: "iproute2",
                    },
                    Tool {
                        program: "dnsmasq",
                        package: "dnsmasq-base",
                    },
                    Tool {
                        program: "socat",
                        package: "socat",
                    },
                    Tool {
                        program: "curl",
                        package: "curl",
                    },
                    Tool {
                        program: "mkfs.fat",
                        package: "dosfstools",
                    },
                    Tool {
                        program: "mcopy",
                        package: "mtools",
                    },
                ],
                &[],
            )?;
            let plan = cluster::Up {
                description: file,
                image,
                state: state.clone(),
                port,
                memory_mib: memory,
                node_timeout: timeout,
                hold,
            };
            let up = cluster::up(&plan).inspect_err(|_| {
                eprintln!("imagebuild: the cluster did not come up; what started is still running: stop it with `imagebuild cluster down --state {}`", state.display());
            })?;
            println!("cluster {} is up", up.name);
            println!(
                "  site:      http://{}/  https://{}/  (send Host: www.foobar.com)",
                up.site, up.site_https
            );
            println!(
                "  namespace: {} (run clients with `ip netns exec {} ...`; the site is {} there)",
                up.namespace, up.namespace, up.target
            );
            println!("  status:    imagebuild cluster status --state {}", state.display());
            println!("  stop:      imagebuild cluster down --state {}", state.display());
            Ok(())
        }
        ClusterCommand::Status { json, host, state } => {
            let status = cluster::status(&state, &host)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!(
                    "cluster {}: site {} (/readyz {}), namespace {}",
                    status.name, status.site, status.site_readyz, status.namespace
                );
                for n in &status.nodes {
                    let mut line = format!(
                        "  {:<8} {:<12} {:<15} {}",
                        n.name,
                        n.roles.join("+"),
                        n.address,
                        if n.running { "running" } else { "stopped" }
                    );
                    if let Some(code) = n.readyz {
                        line.push_str(&format!(", /readyz {code}"));
                    }
                    if let Some(version) = &n.version {
                        line.push_str(&format!(", version {version}"));
                    }
                    if let Some(galera) = &n.galera {
                        line.push_str(&format!(", galera {galera}"));
                    }
                    println!("{line}");
                }
            }
            Ok(())
        }
        ClusterCommand::Start { node, state } => {
            let pid = cluster::start(&state, &node)?;
            println!("{node}: booting (QEMU pid {pid})");
            Ok(())
        }
        ClusterCommand::Stop { node, power_cut, state } => {
            cluster::stop(&state, &node, power_cut)?;
            println!("{node}: {}", if power_cut { "power cut" } else { "powered off" });
            Ok(())
        }
        ClusterCommand::Rollout {
            image,
            role,
            timeout,
            host,
            state,
        } => {
            let plan = cluster::Rollout {
                state,
                image,
                role: foobar_agent::cluster::Role::parse(&role)
                    .ok_or_else(|| anyhow::anyhow!("--role: expected app or db"))?,
                node_timeout: timeout,
                host,
            };
            let done = cluster::rollout(&plan, |line| println!("{line}"))?;
            if !done.replaced.is_empty() {
                println!(
                    "rollout done: {} run {}{}",
                    done.replaced.join(", "),
                    plan.image.display(),
                    if done.spare.is_empty() {
                        String::new()
                    } else {
                        format!(" (free slots holding it, not running: {})", done.spare.join(", "))
                    }
                );
            }
            Ok(())
        }
        ClusterCommand::Down { state } => {
            let stopped = cluster::down(&state)?;
            println!("cluster stopped ({stopped} process(es) ended)");
            Ok(())
        }
    }
}
