//! The cluster description (`cluster.toml`) and what one node makes of it at first boot (`foobar-agent node`).
//!
//! The description names the nodes, their roles and private addresses, and the floating address; it holds no secret
//! (the builder bakes it into the image at `/etc/foobar/cluster.toml`). The secrets a cluster needs (the database
//! password for TCP, the VRRP password) arrive with each instance's configuration (`[secrets]` of the
//! `#foobar-config` fragment), and the node's name with it (`[node] name`) or as its hostname.
//!
//! A node turns on the services of its roles only: first boot writes one marker per service under
//! `/etc/foobar/active/` (each of those units carries `ConditionPathExists=` on its marker), renders the engines'
//! own configuration (Galera's settings, HAProxy, keepalived) and the firewall for its roles. The engines do the
//! rest: Galera replicates, HAProxy checks and retries, keepalived moves the floating address.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// Where the image carries the description, and where first boot records this node and its secrets (0600).
pub const DESCRIPTION: &str = "etc/foobar/cluster.toml";
pub const NODE_FILE: &str = "etc/foobar/node.toml";
/// The roles an instance takes when it is none of the description's nodes (the image config's `role`).
pub const DEFAULT_ROLES: &str = "etc/foobar/default-roles";
/// One empty file per service this node runs; the units' conditions read them.
pub const ACTIVE_DIR: &str = "etc/foobar/active";
/// The agent's database URL on an app node (TCP through the local HAProxy, with the password): 0640 root:foobar.
pub const DATABASE_URL_FILE: &str = "etc/foobar/database-url";
/// Where an app node's HAProxy listens for the agent: one Galera node at a time behind it.
pub const DB_PROXY_PORT: u16 = 3306;
pub const DB_PROXY_ADDRESS: &str = "127.0.0.1";
/// Where each db node says whether it is `Synced` (HTTP 200) or not (503), for HAProxy's checks.
pub const GALERA_CHECK_PORT: u16 = 9200;
/// Where HAProxy's site frontends listen on a node that is lb and app at once (nginx holds 80 and 443 there): the
/// firewall redirects the floating address's 80 and 443 to them.
pub const SHARED_LB_PORTS: (u16, u16) = (10080, 10443);
/// How often the lb nodes ask each app node's `/readyz` while it is up or down, and how many answers of 200 in a row
/// put a node (back) into rotation: a node ready now gets requests within `(rise + 1) * interval` seconds.
pub const APP_CHECK_INTERVAL_SECS: u64 = 2;
pub const APP_CHECK_RISE: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The one-server stack: nginx, the agent and a MariaDB of its own.
    All,
    /// HAProxy in front of the app nodes, keepalived holding the floating address.
    Lb,
    /// nginx and the agent (or the site's `[app]`), reaching the database through a local HAProxy.
    App,
    /// MariaDB with Galera.
    Db,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Lb => "lb",
            Role::App => "app",
            Role::Db => "db",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        [Role::All, Role::Lb, Role::App, Role::Db]
            .into_iter()
            .find(|r| r.name() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Description {
    /// The cluster's name: Galera's cluster name and keepalived's instance.
    pub name: String,
    /// The private network every node is on, `A.B.C.D/N`: the only source the cluster's own ports answer.
    pub network: String,
    /// The address clients use, held by one `lb` node at a time (keepalived). Required with `lb` nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floating_address: Option<Ipv4Addr>,
    /// VRRP's virtual router id (1-255), unique on the network; default 51.
    #[serde(default = "default_router_id")]
    pub router_id: u8,
    #[serde(rename = "node")]
    pub nodes: Vec<Node>,
}

fn default_router_id() -> u8 {
    51
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Node {
    /// A host name: lowercase letters, digits and `-`.
    pub name: String,
    pub roles: Vec<Role>,
    /// Its private address, inside `network`.
    pub address: Ipv4Addr,
}

/// `network`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Option<Network> {
        let (addr, prefix) = text.split_once('/')?;
        let base: Ipv4Addr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok().filter(|p| (8..=30).contains(p))?;
        let net = Network { base, prefix };
        (u32::from(base) & !net.mask() == 0).then_some(net)
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn contains(self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.base)
    }

    /// Neither the network's own address nor its broadcast address.
    pub fn host(self, addr: Ipv4Addr) -> bool {
        let host = u32::from(addr) & !self.mask();
        self.contains(addr) && host != 0 && host != !self.mask()
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl Description {
    /// Reads and checks a description; errors name the file and the key.
    pub fn load(path: &Path) -> anyhow::Result<Description> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the cluster description {}", path.display()))?;
        Description::parse(&text).with_context(|| format!("invalid cluster description {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Description> {
        let description: Description = toml::from_str(text)?;
        description.validate()?;
        Ok(description)
    }

    pub fn network(&self) -> Network {
        Network::parse(&self.network).expect("validated")
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !valid_name(&self.name) {
            bail!(
                "key `name`: expected lowercase letters, digits and `-`, got `{}`",
                self.name
            );
        }
        let Some(network) = Network::parse(&self.network) else {
            bail!(
                "key `network`: expected a private network like 10.88.0.0/24 (prefix 8 to 30, no host bits), got `{}`",
                self.network
            );
        };
        if self.nodes.is_empty() {
            bail!("key `node`: expected at least one [[node]]");
        }
        let (mut names, mut addresses) = (BTreeSet::new(), BTreeSet::new());
        for node in &self.nodes {
            let key = format!("node `{}`", node.name);
            if !valid_name(&node.name) {
                bail!(
                    "key `node.name`: expected a host name (lowercase letters, digits and `-`), got `{}`",
                    node.name
                );
            }
            if !names.insert(&node.name) {
                bail!("key `node.name`: `{}` names two nodes", node.name);
            }
            if !network.host(node.address) {
                bail!(
                    "{key}: key `address`: {} is not a host address of the network {network}",
                    node.address
                );
            }
            if !addresses.insert(node.address) {
                bail!("{key}: key `address`: {} is another node's address too", node.address);
            }
            if node.roles.is_empty() {
                bail!("{key}: key `roles`: expected one or more of lb, app, db");
            }
            if node.roles.contains(&Role::All) {
                bail!("{key}: key `roles`: `all` is the one-server stack; in a cluster, name the roles (lb, app, db)");
            }
        }
        let count = |role| self.nodes.iter().filter(|n| n.roles.contains(&role)).count();
        if count(Role::Lb) > 0 {
            let Some(floating) = self.floating_address else {
                bail!("key `floating-address`: expected the address clients use (lb nodes hold it in turn)");
            };
            if !network.host(floating) || addresses.contains(&floating) {
                bail!("key `floating-address`: expected a free host address of the network {network}, got {floating}");
            }
        }
        if self.router_id == 0 {
            bail!("key `router-id`: expected 1 to 255");
        }
        if count(Role::App) > 0 && count(Role::Db) == 0 {
            bail!("key `node`: app nodes need at least one db node");
        }
        if count(Role::Db) == 2 {
            bail!(
                "key `node`: two db nodes cannot keep a majority when one dies; use one or three (or more, an odd number)"
            );
        }
        Ok(())
    }

    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(move |n| n.roles.contains(&role))
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Every role any node holds: what an image for this cluster installs.
    pub fn roles(&self) -> BTreeSet<Role> {
        self.nodes.iter().flat_map(|n| n.roles.iter().copied()).collect()
    }
}

/// The secrets of a cluster, from the instance configuration; never in an image.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Secrets {
    /// The `foobar` database user's password over TCP (app nodes to db nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_password: Option<String>,
    /// VRRP's shared password between lb nodes (at most 8 characters: VRRP's PASS authentication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vrrp_password: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

impl Secrets {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(p) = &self.database_password {
            if p.len() < 12 || !p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(
                    "key `secrets.database-password`: expected at least 12 letters, digits, `-`, `_` or `.`".into(),
                );
            }
        }
        if let Some(p) = &self.vrrp_password {
            if p.is_empty() || p.len() > 8 || !p.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err("key `secrets.vrrp-password`: expected 1 to 8 letters or digits (VRRP's limit)".into());
            }
        }
        Ok(())
    }
}

/// What the instance configuration said about this node, recorded at first boot (`node.toml`, 0600).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub secrets: Secrets,
}

/// The services a node runs for its roles: the units whose marker first boot writes.
pub fn services(roles: &BTreeSet<Role>) -> BTreeSet<&'static str> {
    let mut out = BTreeSet::new();
    for role in roles {
        let units: &[&str] = match role {
            Role::All => &[
                "nginx.service",
                "foobar-agent.socket",
                "foobar-agent.service",
                "foobar-datadir.service",
                "mariadb.service",
                "foobar-app.service",
                "foobar-backup.timer",
            ],
            Role::Lb => &["haproxy.service", "keepalived.service"],
            Role::App => &[
                "nginx.service",
                "foobar-agent.socket",
                "foobar-agent.service",
                "foobar-app.service",
                "haproxy.service",
            ],
            Role::Db => &[
                "foobar-datadir.service",
                "mariadb.service",
                "foobar-backup.timer",
                "foobar-galera-check.socket",
                "foobar-galera-check.service",
            ],
        };
        out.extend(units.iter().copied());
    }
    out
}

/// Which node this is and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The description's node, or none (an instance outside the cluster takes the default roles).
    pub node: Option<Node>,
    pub roles: BTreeSet<Role>,
}

/// Finds this instance in the description: by the name the instance configuration gave, else by its hostname.
/// A name given but not in the description is an error (a typo must not make a stray single server).
pub fn place(
    description: Option<&Description>,
    given: Option<&str>,
    hostname: &str,
    default_roles: &BTreeSet<Role>,
) -> anyhow::Result<Placement> {
    let found = match (description, given) {
        (None, Some(name)) => bail!("the instance configuration names the node `{name}`, but this image has no cluster description"),
        (None, None) => None,
        (Some(d), Some(name)) => match d.node(name) {
            Some(node) => Some(node.clone()),
            None => bail!(
                "the instance configuration names the node `{name}`, which the cluster description does not have (its nodes: {})",
                d.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        },
        (Some(d), None) => d.node(hostname.split('.').next().unwrap_or("")).cloned(),
    };
    Ok(match found {
        Some(node) => Placement {
            roles: node.roles.iter().copied().collect(),
            node: Some(node),
        },
        None => Placement {
            node: None,
            roles: default_roles.clone(),
        },
    })
}

/// keepalived's `interface` in the file first boot writes: the interface that holds the node's address is known
/// only once the network is up, so keepalived's unit puts it in before each start (`image/files/keepalived-config`).
pub const INTERFACE_PLACEHOLDER: &str = "@PRIVATE_INTERFACE@";

/// What the machine itself tells, for the engines' settings.
#[derive(Debug, Clone)]
pub struct Host {
    /// The site's canonical name: the Host of the load balancer's health checks.
    pub canonical: String,
}

/// A file to write: its path under the root, its text and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub path: String,
    pub text: String,
    pub mode: u32,
    /// The group that may read it (besides root).
    pub group: Option<&'static str>,
}

fn output(path: &str, text: String, mode: u32) -> Output {
    Output {
        path: path.to_string(),
        text,
        mode,
        group: None,
    }
}

/// Everything this node's roles need written, from the description and the secrets. Missing secrets a role needs
/// are an error naming the key.
pub fn render(description: &Description, node: &Node, secrets: &Secrets, host: &Host) -> anyhow::Result<Vec<Output>> {
    let roles: BTreeSet<Role> = node.roles.iter().copied().collect();
    let network = description.network();
    let mut out = Vec::new();
    let dbs: Vec<&Node> = description.with_role(Role::Db).collect();
    let apps: Vec<&Node> = description.with_role(Role::App).collect();
    let need = |secret: &Option<String>, key: &str, role: &str| {
        secret.clone().with_context(|| {
            format!(
                "the {role} role needs `secrets.{key}` in the instance configuration (#foobar-config [secrets]); \
                 it is never in the image"
            )
        })
    };

    if roles.contains(&Role::Db) {
        let peers: Vec<String> = dbs.iter().map(|n| n.address.to_string()).collect();
        out.push(output(
            "etc/mysql/mariadb.conf.d/99-foobar-cluster.cnf",
            format!(
                "# foobar: this node of the Galera cluster `{name}` (written at first boot from /etc/foobar/cluster.toml)\n\
                 [mysqld]\n\
                 skip-networking = 0\n\
                 bind-address = {addr}\n\
                 # Clients are told by address (the users' host is the network): no reverse lookup to wait for.\n\
                 skip-name-resolve = ON\n\
                 binlog_format = ROW\n\
                 default_storage_engine = InnoDB\n\
                 innodb_autoinc_lock_mode = 2\n\
                 wsrep_on = ON\n\
                 wsrep_provider = /usr/lib/galera/libgalera_smm.so\n\
                 wsrep_cluster_name = {name}\n\
                 wsrep_cluster_address = gcomm://{peers}\n\
                 wsrep_node_name = {node}\n\
                 wsrep_node_address = {addr}\n\
                 wsrep_sst_method = rsync\n\
                 # Reads wait for every write the cluster committed before them: a post read back right after its\n\
                 # insert is found even when the two went to different nodes (the app nodes' proxy changed node).\n\
                 wsrep_sync_wait = 1\n\
                 # A joining node copies the whole data directory: a small redo log keeps that short.\n\
                 innodb_log_file_size = 16M\n\
                 # pc.recovery: after a power cut of every node, the last primary component forms again by itself.\n\
                 # evs.suspect_timeout: a node silent for 3 s (3 missed keepalives) is dropped by the others' consensus;\n\
                 # until then every commit waits. Galera's default is 5 s.\n\
                 wsrep_provider_options = \"pc.recovery=TRUE;evs.suspect_timeout=PT3S;gcache.size=32M;gmcast.listen_addr=tcp://{addr}:4567;ist.recv_addr={addr}\"\n",
                name = description.name,
                addr = node.address,
                node = node.name,
                peers = peers.join(","),
            ),
            0o644,
        ));
        // Which node starts a new cluster when none answers (`foobar-agent galera-start`): the first db node.
        out.push(output(
            "etc/foobar/galera-peers",
            dbs.iter()
                .filter(|n| n.name != node.name)
                .map(|n| format!("{}\n", n.address))
                .collect(),
            0o644,
        ));
        if dbs.first().is_some_and(|n| n.name == node.name) {
            out.push(output("etc/foobar/galera-first", String::new(), 0o644));
        }
        let password = need(&secrets.database_password, "database-password", "db")?;
        out.push(output(
            "etc/foobar/cluster-users.sql",
            format!(
                "-- foobar: the app nodes' database user over TCP, from the private network only (first boot; replicated).\n\
                 CREATE USER IF NOT EXISTS `foobar`@`{host}` IDENTIFIED BY '{password}';\n\
                 ALTER USER `foobar`@`{host}` IDENTIFIED BY '{password}';\n\
                 GRANT ALL PRIVILEGES ON foobar.* TO `foobar`@`{host}`;\n",
                host = mysql_host_pattern(network),
            ),
            0o600,
        ));
    }

    let mut haproxy = String::from(HAPROXY_GLOBAL);
    if roles.contains(&Role::Lb) {
        let (http, https) = lb_ports(&roles);
        haproxy.push_str(&format!(
            "\n# The site: HTTP, and HTTPS ended here with the site's certificate (first boot puts it and its key in\n\
             # {LB_CERTIFICATE}); HTTPS goes on to the app nodes' own HTTPS, so their redirects and HSTS hold.\n\
             frontend site\n    bind :{http}\n    bind :{https} ssl crt {LB_CERTIFICATE} alpn h2,http/1.1\n    \
             mode http\n    option httplog\n    \
             http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}\n    \
             http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}\n    \
             use_backend apps_https if {{ ssl_fc }}\n    default_backend apps_http\n",
        ));
        haproxy.push_str(&apps_backend("apps_http", 80, "", &apps, &host.canonical));
        haproxy.push_str(&apps_backend(
            "apps_https",
            443,
            // The app nodes' certificates are each its own self-signed one unless the operator gave one: the private
            // network is the trust here, and the client's name goes on for nginx.
            " ssl verify none sni ssl_fc_sni",
            &apps,
            &host.canonical,
        ));
        haproxy.push_str(&format!(
            "\n# Checks only (no traffic): whether each app node's agent lives, for the backups above.\n\
             backend apps_live\n    mode http\n    option httpchk\n    \
             http-check send meth GET uri /livez hdr Host {canonical}\n    http-check expect status 200\n    \
             default-server check inter 2s fastinter 1s fall 2 rise 2\n",
            canonical = host.canonical,
        ));
        for app in &apps {
            haproxy.push_str(&format!("    server {} {}:80\n", app.name, app.address));
        }
        let password = need(&secrets.vrrp_password, "vrrp-password", "lb")?;
        let floating = description.floating_address.expect("validated: lb nodes need it");
        let lbs: Vec<&Node> = description.with_role(Role::Lb).collect();
        let rank = lbs.iter().position(|n| n.name == node.name).unwrap_or(0);
        let peers: String = lbs
            .iter()
            .filter(|n| n.name != node.name)
            .map(|n| format!("        {}\n", n.address))
            .collect();
        out.push(output(
            "etc/keepalived/keepalived.conf",
            format!(
                "# foobar: the floating address {floating} (written at first boot). The lb node whose HAProxy runs and\n\
                 # that has the highest priority holds it; when it dies, the next takes it within about 3 s.\n\
                 global_defs {{\n    router_id {node}\n}}\n\n\
                 # HAProxy's process, watched through the kernel's process events (no polling).\n\
                 vrrp_track_process haproxy_running {{\n    process haproxy\n    quorum 1\n    delay 1\n}}\n\n\
                 vrrp_instance {name} {{\n    state BACKUP\n    interface {iface}\n    virtual_router_id {router}\n    \
                 priority {priority}\n    advert_int 1\n    nopreempt\n    unicast_src_ip {addr}\n    unicast_peer {{\n{peers}    }}\n    \
                 authentication {{\n        auth_type PASS\n        auth_pass {password}\n    }}\n    \
                 virtual_ipaddress {{\n        {floating}/{prefix}\n    }}\n    track_process {{\n        haproxy_running\n    }}\n}}\n",
                node = node.name,
                name = description.name,
                iface = INTERFACE_PLACEHOLDER,
                router = description.router_id,
                // Near the top: a backup waits 3 adverts plus (256 - priority) / 256 of one before it takes over,
                // so 253 waits 0.01 s more where 140 would wait 0.45 s.
                priority = 254 - rank.min(200) as u32,
                addr = node.address,
                prefix = network.prefix,
            ),
            0o600,
        ));
    }
    if roles.contains(&Role::App) {
        haproxy.push_str(&format!(
            "\n# The agent's database: one Galera node at a time (the others are backups), so that every app node writes\n\
             # to the same node and a migration lock holds across them; a node that is not Synced gets nothing.\n\
             listen database\n    bind {DB_PROXY_ADDRESS}:{DB_PROXY_PORT}\n    mode tcp\n    option tcplog\n    \
             option httpchk GET /\n    http-check expect status 200\n    timeout client 1h\n    timeout server 1h\n    \
             # Two connections the node does not accept within 1 s take it out at once (no wait for the checks) and\n    \
             # go to the next node; taken out, its open sessions are closed, so the agent's pool reconnects. A check\n    \
             # slower than 3 s fails; three in a row take the node out (one slow answer of a busy node does not).\n    \
             timeout connect 1s\n    timeout check 3s\n    retries 2\n    option redispatch 1\n    \
             default-server check port {GALERA_CHECK_PORT} inter 1s fastinter 500ms fall 3 rise 2 \
             observe layer4 error-limit 2 on-error mark-down on-marked-down shutdown-sessions\n"
        ));
        for (i, db) in dbs.iter().enumerate() {
            let backup = if i == 0 { "" } else { " backup" };
            haproxy.push_str(&format!("    server {} {}:3306{backup}\n", db.name, db.address));
        }
        let password = need(&secrets.database_password, "database-password", "app")?;
        out.push(Output {
            path: DATABASE_URL_FILE.to_string(),
            text: format!("mysql://foobar:{password}@{DB_PROXY_ADDRESS}:{DB_PROXY_PORT}/foobar\n"),
            mode: 0o640,
            group: Some("foobar"),
        });
    }
    if roles.contains(&Role::Lb) || roles.contains(&Role::App) {
        out.push(output("etc/haproxy/haproxy.cfg", haproxy, 0o644));
    }
    if roles.contains(&Role::App) {
        // Behind the load balancers: the client's address (for the rate limits and logs) from their X-Forwarded-For.
        out.push(output(
            "etc/foobar/nginx-cluster.conf",
            format!("# foobar: written at first boot\nset_real_ip_from {network};\nreal_ip_header X-Forwarded-For;\n"),
            0o644,
        ));
    }
    out.push(output("etc/nftables.conf", firewall(description, node)?, 0o755));
    Ok(out)
}

const HAPROXY_GLOBAL: &str = "# foobar: written at first boot from /etc/foobar/cluster.toml\n\
global\n    log /dev/log local0\n    maxconn 4096\n    user haproxy\n    group haproxy\n    daemon\n    \
stats socket /run/haproxy/admin.sock mode 660 level admin\n    \
ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets\n    \
ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:\
ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305\n\n\
defaults\n    log global\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    timeout check 2s\n";

/// Where an lb node's HAProxy reads the site's certificate and key (one file; first boot writes it, root only).
pub const LB_CERTIFICATE: &str = "/etc/foobar/tls/lb.pem";

/// An lb node's backend of the app nodes on `port` (`options` on each server, for example TLS): `apps_http` checks
/// each node's `/readyz`; another backend follows those checks (one check per node). Every app node is also a backup
/// that follows `apps_live` (`/livez`), for when none is ready.
fn apps_backend(name: &str, port: u16, options: &str, apps: &[&Node], canonical: &str) -> String {
    let checked = name == "apps_http";
    let mut text = format!(
        "\nbackend {name}\n    mode http\n    balance roundrobin\n    option forwardfor\n    \
         # A request that met a dead or draining node is sent to another (POSTs only when none of it was sent).\n    \
         retries 3\n    option redispatch 1\n    retry-on conn-failure empty-response response-timeout 502 503\n    \
         http-request disable-l7-retry if METH_POST\n    \
         # A new connection to the app node for each request: one to a dead node fails to connect, which is\n    \
         # retried for every method, where a reused one would take the request and never answer.\n    \
         option http-server-close\n    timeout server 5s\n"
    );
    if checked {
        text.push_str(&format!(
            "    option httpchk\n    http-check send meth GET uri /readyz hdr Host {canonical}\n    \
             http-check expect status 200\n    default-server check inter {APP_CHECK_INTERVAL_SECS}s fastinter 1s fall 2 \
             rise {APP_CHECK_RISE}\n"
        ));
    }
    for app in apps {
        let track = if checked {
            String::new()
        } else {
            format!(" track apps_http/{}", app.name)
        };
        text.push_str(&format!(
            "    server {} {}:{port}{options}{track}\n",
            app.name, app.address
        ));
    }
    // When no app node is ready (the database tier is re-forming, which every app node sees at once), the live ones
    // still get the requests: they answer once the database does, where HAProxy would answer 503 itself.
    text.push_str("    # No app node ready: every live one (its /livez answers), rather than a 503 from here.\n    option allbackups\n");
    for app in apps {
        text.push_str(&format!(
            "    server {name}-live {addr}:{port}{options} backup no-check track apps_live/{name}\n",
            name = app.name,
            addr = app.address
        ));
    }
    text
}

/// The ports of HAProxy's site frontends: 80 and 443, or on a node that also runs nginx (app), `SHARED_LB_PORTS`.
fn lb_ports(roles: &BTreeSet<Role>) -> (u16, u16) {
    if roles.contains(&Role::App) {
        SHARED_LB_PORTS
    } else {
        (80, 443)
    }
}

/// MariaDB's host pattern for the network: `10.88.0.%` for a /24, otherwise `base/mask`.
fn mysql_host_pattern(network: Network) -> String {
    let mask = Ipv4Addr::from(network.mask());
    format!("{}/{}", network.base, mask)
}

/// The firewall of one node: SSH, ICMP and DHCP from anywhere; 80 and 443 from anywhere on lb nodes, from the
/// private network on app nodes; the database's and Galera's ports, VRRP and the Galera check from the private
/// network only.
pub fn firewall(description: &Description, node: &Node) -> anyhow::Result<String> {
    let roles: BTreeSet<Role> = node.roles.iter().copied().collect();
    let (mut public, mut private) = (vec![22u16], Vec::new());
    if roles.contains(&Role::Lb) {
        public.extend([80, 443]);
    }
    if roles.contains(&Role::App) {
        private.extend([80, 443]);
    }
    if roles.contains(&Role::Db) {
        private.extend([3306, 4444, 4567, 4568, GALERA_CHECK_PORT]);
    }
    let network = description.network();
    let mut text = format!(
        "#!/usr/sbin/nft -f\n# foobar: node {} ({}) of the cluster {}: written at first boot.\nflush ruleset\n\n\
         table inet foobar {{\n    chain input {{\n        type filter hook input priority filter; policy drop;\n        \
         iif \"lo\" accept\n        ct state established,related accept\n        ct state invalid drop\n        \
         ip protocol 1 accept\n        meta l4proto 58 accept\n        \
         udp sport 67 udp dport 68 accept comment \"DHCPv4 replies\"\n        \
         udp sport 547 udp dport 546 accept comment \"DHCPv6 replies\"\n        tcp dport {{ {} }} accept\n",
        node.name,
        node.roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "),
        description.name,
        public.iter().map(u16::to_string).collect::<Vec<_>>().join(", "),
    );
    if !private.is_empty() {
        text.push_str(&format!(
            "        ip saddr {network} tcp dport {{ {} }} accept comment \"the cluster's private network\"\n",
            private.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
        ));
    }
    if roles.contains(&Role::Db) {
        text.push_str(&format!(
            "        ip saddr {network} udp dport 4567 accept comment \"Galera\"\n"
        ));
    }
    if roles.contains(&Role::Lb) {
        text.push_str(&format!(
            "        ip saddr {network} ip protocol 112 accept comment \"VRRP\"\n"
        ));
    }
    let shared = roles.contains(&Role::Lb) && roles.contains(&Role::App);
    if shared {
        text.push_str(&format!(
            "        tcp dport {{ {}, {} }} ct status dnat accept comment \"the floating address, redirected to HAProxy\"\n",
            SHARED_LB_PORTS.0, SHARED_LB_PORTS.1
        ));
    }
    text.push_str(
        "    }\n    chain forward {\n        type filter hook forward priority filter; policy drop;\n    }\n}\n",
    );
    if shared {
        // nginx answers 80 and 443 on every address of the node; the site's own address goes to HAProxy instead.
        let floating = description
            .floating_address
            .context("validated: a cluster with lb nodes has a floating address")?;
        text.push_str(&format!(
            "\ntable ip foobar_lb {{\n    chain prerouting {{\n        type nat hook prerouting priority dstnat;\n        \
             ip daddr {floating} tcp dport 80 redirect to :{}\n        \
             ip daddr {floating} tcp dport 443 redirect to :{}\n    }}\n}}\n",
            SHARED_LB_PORTS.0, SHARED_LB_PORTS.1
        ));
    }
    Ok(text)
}

const HOSTS_BEGIN: &str = "# foobar: the cluster's nodes (written at first boot)";
const HOSTS_END: &str = "# foobar: end of the cluster's nodes";

/// `/etc/hosts` with every node's name and address (in place of an earlier such block): the engines look their
/// peers up by address (rsync's daemon during a state transfer does), and no DNS server may answer for them.
pub fn hosts(current: &str, description: &Description) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in current.lines() {
        if line == HOSTS_BEGIN {
            inside = true;
        } else if line == HOSTS_END {
            inside = false;
        } else if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(HOSTS_BEGIN);
    out.push('\n');
    for node in &description.nodes {
        out.push_str(&format!("{} {}\n", node.address, node.name));
    }
    out.push_str(HOSTS_END);
    out.push('\n');
    out
}

/// `foobar-agent node`: places this instance and writes what its roles need under `root`. Returns the placement.
pub fn activate(root: &Path, hostname: &str, host: &Host) -> anyhow::Result<Placement> {
    let description_path = root.join(DESCRIPTION);
    let description = if description_path.exists() {
        Some(Description::load(&description_path)?)
    } else {
        None
    };
    let node_path = root.join(NODE_FILE);
    let node_file: NodeFile = match std::fs::read_to_string(&node_path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("invalid {}", node_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NodeFile::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", node_path.display())),
    };
    let defaults_path = root.join(DEFAULT_ROLES);
    let mut default_roles = BTreeSet::new();
    if let Ok(text) = std::fs::read_to_string(&defaults_path) {
        for word in text.split_whitespace() {
            default_roles.insert(
                Role::parse(word).with_context(|| format!("{}: unknown role `{word}`", defaults_path.display()))?,
            );
        }
    }
    let placement = place(
        description.as_ref(),
        node_file.name.as_deref(),
        hostname,
        &default_roles,
    )?;
    let mut outputs = Vec::new();
    if let (Some(description), Some(node)) = (&description, &placement.node) {
        outputs = render(description, node, &node_file.secrets, host)?;
        outputs.push(output(
            "etc/hosts",
            hosts(
                &std::fs::read_to_string(root.join("etc/hosts")).unwrap_or_default(),
                description,
            ),
            0o644,
        ));
    }
    for o in &outputs {
        write_file(root, o)?;
    }
    let active = root.join(ACTIVE_DIR);
    let new = root.join(format!("{ACTIVE_DIR}.new"));
    let _ = std::fs::remove_dir_all(&new);
    std::fs::create_dir_all(&new).with_context(|| format!("cannot create {}", new.display()))?;
    for service in services(&placement.roles) {
        std::fs::write(new.join(service), "").with_context(|| format!("cannot write {}", new.display()))?;
    }
    let _ = std::fs::remove_dir_all(&active);
    std::fs::rename(&new, &active)
        .with_context(|| format!("cannot rename {} to {}", new.display(), active.display()))?;
    Ok(placement)
}

fn write_file(root: &Path, o: &Output) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let path: PathBuf = root.join(&o.path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("foobar-new");
    std::fs::write(&tmp, &o.text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(o.mode))?;
    if let Some(group) = o.group {
        if let Some(gid) = group_id(group) {
            std::os::unix::fs::chown(&tmp, Some(0), Some(gid))
                .with_context(|| format!("cannot give {} to the group {group}", tmp.display()))?;
        }
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam reads a NUL-terminated name and returns a pointer into static storage, read at once.
    let group = unsafe { libc::getgrnam(name.as_ptr()) };
    (!group.is_null()).then(|| unsafe { (*group).gr_gid })
}
