//! The `foobar-agent` command line: parses flags and dispatches.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use foobar_agent::config::{Config, Listen};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "foobar-agent", version, about = "Application server of the foobar image")]
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
    /// Apply pending migrations once and exit; non-zero with the reason when they cannot be applied
    Migrate {
        #[command(flatten)]
        common: Common,
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
        Command::Migrate { common } => {
            let applied = foobar_agent::serve::migrate_once(load(&common)?).await?;
            println!(
                "applied {} migration(s); schema version {}",
                applied.newly_applied, applied.version
            );
            Ok(())
        }
    }
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
