//! `foobar-agent galera-start`: before MariaDB starts on a db node, whether it starts a new Galera cluster or joins
//! one. Galera itself replicates, transfers state and re-forms its primary component; this only answers the one
//! question Galera leaves to whoever starts the server, from Galera's own files:
//!
//! - a peer is Synced in a primary component (its check on port 9200 says 200): join it (a state transfer brings
//!   this node up to date);
//! - `grastate.dat` says `safe_to_bootstrap: 1` (this node stopped last, cleanly): start the cluster again from it;
//! - `gvwstate.dat` exists (the node was cut off, not stopped): start normally; with `pc.recovery` the last primary
//!   component forms again by itself once its nodes are back;
//! - the node was never in a cluster and is the description's first db node (`galera-first`): start a new one;
//! - otherwise wait for the node that may start it (the start fails and systemd tries again).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

/// What MariaDB's unit reads: `_WSREP_NEW_CLUSTER=--wsrep-new-cluster` or empty.
pub const ENV_FILE: &str = "/run/foobar-galera.env";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    NewCluster(String),
    Join(String),
}

/// What Galera recorded in the data directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// `grastate.dat` exists with a cluster's uuid (not all zeros).
    pub was_member: bool,
    pub safe_to_bootstrap: bool,
    /// `gvwstate.dat` exists: the node did not leave its primary component cleanly.
    pub view_saved: bool,
}

impl State {
    pub fn read(datadir: &Path) -> State {
        let grastate = std::fs::read_to_string(datadir.join("grastate.dat")).unwrap_or_default();
        let value = |key: &str| {
            grastate
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim_start_matches(':').trim().to_string())
        };
        let uuid = value("uuid").unwrap_or_default();
        State {
            was_member: !uuid.is_empty() && uuid.chars().any(|c| c != '0' && c != '-'),
            safe_to_bootstrap: value("safe_to_bootstrap").as_deref() == Some("1"),
            view_saved: datadir.join("gvwstate.dat").exists(),
        }
    }
}

pub fn decide(state: &State, first: bool, synced_peer: Option<Ipv4Addr>) -> Start {
    if let Some(peer) = synced_peer {
        return Start::Join(format!(
            "{peer} is Synced in a primary component: joining the cluster through it"
        ));
    }
    if state.safe_to_bootstrap {
        return Start::NewCluster(
            "no peer is Synced and this node stopped last (grastate.dat: safe_to_bootstrap: 1): starting the cluster \
             from it"
                .into(),
        );
    }
    if state.view_saved {
        return Start::Join(
            "no peer is Synced yet and this node was cut off (gvwstate.dat): starting normally; the cluster forms \
             again by itself (pc.recovery) once its other nodes are back"
                .into(),
        );
    }
    if !state.was_member && first {
        return Start::NewCluster(
            "no peer is Synced and this node, the description's first db node, was never in a cluster: starting a \
             new one"
                .into(),
        );
    }
    Start::Join(
        "no peer is Synced: waiting to join the node that may start the cluster (the one that stopped last, or the \
         first db node on the first boot)"
            .into(),
    )
}

/// The first peer whose Galera check (HTTP on port 9200) answers 200, asked `rounds` times a second apart.
pub fn synced_peer(peers: &[Ipv4Addr], rounds: u32) -> Option<Ipv4Addr> {
    use std::io::{Read as _, Write as _};
    for round in 0..rounds {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        for peer in peers {
            let addr = SocketAddr::from((*peer, crate::cluster::GALERA_CHECK_PORT));
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(700)) else {
                continue;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut head = [0u8; 12];
            let synced = stream.write_all(b"GET / HTTP/1.0\r\nHost: galera\r\n\r\n").is_ok()
                && stream.read_exact(&mut head).is_ok()
                && head.starts_with(b"HTTP/1.")
                && &head[9..12] == b"200";
            if synced {
                return Some(*peer);
            }
        }
    }
    None
}

/// Decides and writes the environment file for MariaDB's unit. A machine that is no db node (no Galera settings)
/// gets an empty one.
pub fn run(root: &Path, datadir: &Path) -> anyhow::Result<Start> {
    let peers_file = root.join("etc/foobar/galera-peers");
    let start = if !root.join("etc/mysql/mariadb.conf.d/99-foobar-cluster.cnf").exists() {
        Start::Join("not a db node of a cluster: MariaDB starts on its own".into())
    } else {
        let text =
            std::fs::read_to_string(&peers_file).with_context(|| format!("cannot read {}", peers_file.display()))?;
        let peers: Vec<Ipv4Addr> = text
            .split_whitespace()
            .map(|p| {
                p.parse()
                    .with_context(|| format!("{}: `{p}` is not an address", peers_file.display()))
            })
            .collect::<anyhow::Result<_>>()?;
        let first = root.join("etc/foobar/galera-first").exists();
        decide(&State::read(datadir), first, synced_peer(&peers, 3))
    };
    let line = match &start {
        Start::NewCluster(_) => "_WSREP_NEW_CLUSTER=--wsrep-new-cluster\n",
        Start::Join(_) => "_WSREP_NEW_CLUSTER=\n",
    };
    let env = root.join(ENV_FILE.trim_start_matches('/'));
    std::fs::write(&env, line).with_context(|| format!("cannot write {}", env.display()))?;
    Ok(start)
}

/// The database URL of `galera-check`: MariaDB's root over its socket (unix_socket authentication; the check runs as
/// root and reads two status variables).
pub const CHECK_DATABASE_URL: &str = "mysql://root@localhost/?socket=/run/mysqld/mysqld.sock";

/// How long `galera-check` answers 503 `draining` after SIGTERM before it exits. Its unit is ordered after MariaDB's,
/// so when the machine stops (the power button, `poweroff`) this comes first: the app nodes' HAProxy marks the
/// node down after 3 failed checks (inter 1 s, fastinter 500 ms: within 2 s) and closes its sessions, the agents'
/// pools reconnect to the next node, and only then does MariaDB stop, with no client left on it.
pub const DRAIN: Duration = Duration::from_secs(4);

/// `foobar-agent galera-check`: answers every HTTP request with 200 `synced` when this node is Synced
/// (`wsrep_local_state` 4) in the primary component, 503 with what it is otherwise (HAProxy's check on the app
/// nodes). One connection to MariaDB, kept; each answer within a second. On SIGTERM it answers 503 `draining` for
/// `drain`, then exits.
pub async fn check_server(listener: std::net::TcpListener, url: &str, drain: Duration) -> anyhow::Result<()> {
    use axum::http::StatusCode;
    use sqlx::mysql::MySqlPoolOptions;
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(url)
        .context("galera-check: invalid database URL")?;
    let draining = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = draining.clone();
    let handler = move || {
        let pool = pool.clone();
        let draining = flag.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            if draining {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not synced: draining (this node is stopping)\n".to_string(),
                );
            }
            let rows: Result<Vec<(String, String)>, _> = tokio::time::timeout(
                Duration::from_secs(1),
                sqlx::query_as(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_cluster_status', 'wsrep_local_state')",
                )
                .fetch_all(&pool),
            )
            .await
            .map_err(|_| "no answer from MariaDB within 1 s".to_string())
            .and_then(|r| r.map_err(|e| format!("MariaDB: {e}")));
            match rows {
                Ok(rows) => {
                    let get = |k: &str| {
                        rows.iter()
                            .find(|(n, _)| n.eq_ignore_ascii_case(k))
                            .map_or("-", |(_, v)| v.as_str())
                            .to_string()
                    };
                    let (status, state) = (get("wsrep_cluster_status"), get("wsrep_local_state"));
                    if status == "Primary" && state == "4" {
                        (StatusCode::OK, "synced\n".to_string())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not synced: wsrep_cluster_status {status}, wsrep_local_state {state}\n"),
                        )
                    }
                }
                Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not synced: {e}\n")),
            }
        }
    };
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = axum::Router::new().fallback(handler);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            crate::serve::shutdown_signal().await;
            draining.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!(
                "galera-check: stopping: answering 503 (draining) for {} s",
                drain.as_secs()
            );
            tokio::time::sleep(drain).await;
        })
        .await
        .context("galera-check: serving")
}
