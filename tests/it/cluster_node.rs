//! A cluster node's first boot, fast: the real `foobar-agent instance-config` and `foobar-agent node` on a scratch
//! root with the example description, then what each role gets (the engines' settings, checked by HAProxy itself
//! where it is installed), what it does not, and the errors that name the problem. Also the description's checks,
//! Galera's start decision from its own files, and what the builder makes of a config with a cluster.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use foobar_agent::cluster::Description;
use foobar_agent::galera::{decide, Start, State};

use crate::support;

const PASSWORD: &str = "correct-horse-battery";
const VRRP: &str = "s3cret42";

fn example_description() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster/cluster.toml")).unwrap()
}

/// A root as the cluster image has it: the description, the default roles, site.env and a hostname.
fn root_with(tag: &str, description: &str) -> PathBuf {
    let root = support::temp_dir(tag);
    for (path, text) in [
        ("etc/foobar/cluster.toml", description),
        ("etc/foobar/default-roles", "all\n"),
        (
            "etc/foobar/site.env",
            "DOMAIN='foobar.com'\nCANONICAL='www.foobar.com'\n",
        ),
        ("etc/hostname", "localhost\n"),
        ("etc/hosts", "127.0.0.1 localhost\n"),
    ] {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
    root
}

/// First boot's two steps: the instance configuration from a NoCloud seed with `user_data`, then `node` (here not run
/// when the first fails, so that each step's own errors are seen).
fn first_boot(root: &Path, user_data: &str) -> (i32, String, String) {
    let seed = support::temp_dir("node-seed");
    std::fs::write(seed.join("meta-data"), "instance-id: i-1\n").unwrap();
    std::fs::write(seed.join("user-data"), user_data).unwrap();
    let dmi = support::temp_dir("node-dmi");
    std::fs::write(dmi.join("sys_vendor"), "QEMU\n").unwrap();
    let (code, out, err) = support::agent_command(&[
        "instance-config",
        "--root",
        root.to_str().unwrap(),
        "--dmi-dir",
        dmi.to_str().unwrap(),
        "--seed-dir",
        seed.to_str().unwrap(),
    ]);
    if code != 0 {
        return (code, out, err);
    }
    support::agent_command(&["node", "--root", root.to_str().unwrap()])
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn mode(root: &Path, path: &str) -> u32 {
    std::fs::metadata(root.join(path)).unwrap().permissions().mode() & 0o777
}

fn active(root: &Path) -> Vec<String> {
    let mut units: Vec<String> = std::fs::read_dir(root.join("etc/foobar/active"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    units.sort();
    units
}

fn fragment(node: &str, secrets: &str) -> String {
    format!("#foobar-config\n[node]\nname = \"{node}\"\n\n[secrets]\n{secrets}")
}

/// `haproxy -c` on a rendered file, where HAProxy is installed (`scripts/deps.sh` installs it). An lb node's file reads
/// the site's certificate and key from the file first boot makes of them: made here by first boot's own function
/// (`lb_certificate` in `image/files/firstboot`, run by dash) from a self-signed pair, in the node's root.
fn haproxy_accepts(root: &Path) {
    if support::which("haproxy").is_none() {
        eprintln!("haproxy is not installed: its own check of the rendered file is skipped");
        return;
    }
    let mut config = read(root, "etc/haproxy/haproxy.cfg");
    let pem = root.join(foobar_agent::cluster::LB_CERTIFICATE.trim_start_matches('/'));
    if config.contains(foobar_agent::cluster::LB_CERTIFICATE) {
        let (cert, key) = support::self_signed_certificate(&support::temp_dir("node-tls"), &["www.foobar.com"]);
        let (code, text) = firstboot_function(
            "lb_certificate",
            &format!(
                "ACTIVE_DIR={active} LB_CERTIFICATE={pem} TLS_CERTIFICATE={cert} TLS_KEY={key}",
                active = root.join("etc/foobar/active").display(),
                pem = pem.display(),
                cert = cert.display(),
                key = key.display()
            ),
        );
        assert_eq!(code, 0, "{text}");
        let pem_text = std::fs::read_to_string(&pem).unwrap();
        let expected = std::fs::read_to_string(&cert).unwrap() + &std::fs::read_to_string(&key).unwrap();
        assert_eq!(pem_text, expected, "the certificate, then its key");
        assert_eq!(std::fs::metadata(&pem).unwrap().permissions().mode() & 0o777, 0o600);
        config = config.replace(foobar_agent::cluster::LB_CERTIFICATE, pem.to_str().unwrap());
    }
    let file = root.join("haproxy-check.cfg");
    std::fs::write(&file, &config).unwrap();
    let out = std::process::Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "haproxy -c refuses the rendered file: {}{}\n{config}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// One function of `image/files/firstboot`, run by dash after `vars` (shell assignments): its exit code and output.
fn firstboot_function(name: &str, vars: &str) -> (i32, String) {
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/files/firstboot")).unwrap();
    let start = script
        .find(&format!("\n{name}() {{"))
        .unwrap_or_else(|| panic!("no {name}() in firstboot"));
    let end = script[start + 1..].find("\n}\n").unwrap() + start + 4;
    let body = format!(
        "say() {{ echo \"say: $*\"; }}\n{}\n{vars}\n{name}\n",
        &script[start..end]
    );
    let out = std::process::Command::new("dash")
        .arg("-c")
        .arg(&body)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn an_app_node_gets_nginx_the_agent_and_a_local_database_proxy_with_its_secret_and_no_database() {
    let root = root_with("node-app", &example_description());
    let (code, out, err) = first_boot(
        &root,
        &fragment("app1", &format!("database-password = \"{PASSWORD}\"\n")),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("node app1 (10.88.0.21) of the cluster: roles app"),
        "{out}"
    );
    assert_eq!(
        active(&root),
        [
            "foobar-agent.service",
            "foobar-agent.socket",
            "foobar-app.service",
            "haproxy.service",
            "nginx.service"
        ]
    );
    // The secret: in the node file (root only) and the agent's URL (0640), never in the record.
    assert_eq!(mode(&root, "etc/foobar/node.toml"), 0o600);
    assert_eq!(
        read(&root, "etc/foobar/database-url").trim(),
        format!("mysql://foobar:{PASSWORD}@127.0.0.1:3306/foobar")
    );
    assert_eq!(mode(&root, "etc/foobar/database-url"), 0o640);
    let record = read(&root, "var/lib/foobar/instance.json");
    assert!(!record.contains(PASSWORD) && record.contains("app1"), "{record}");
    // The database proxy: db1 first, the others backups, each checked on 9200; no front end for the site.
    let haproxy = read(&root, "etc/haproxy/haproxy.cfg");
    assert!(haproxy.contains("bind 127.0.0.1:3306"), "{haproxy}");
    assert!(haproxy.contains("server db1 10.88.0.31:3306\n"), "{haproxy}");
    assert!(haproxy.contains("server db2 10.88.0.32:3306 backup"), "{haproxy}");
    assert!(haproxy.contains("check port 9200"), "{haproxy}");
    assert!(!haproxy.contains("bind :80"), "{haproxy}");
    haproxy_accepts(&root);
    // The firewall: the site's ports from the private network only, no database port.
    let nft = read(&root, "etc/nftables.conf");
    assert!(
        nft.contains("ip saddr 10.88.0.0/24 tcp dport { 80, 443 } accept"),
        "{nft}"
    );
    assert!(
        nft.contains("tcp dport { 22 } accept") && !nft.contains("3306"),
        "{nft}"
    );
    assert!(read(&root, "etc/foobar/nginx-cluster.conf").contains("set_real_ip_from 10.88.0.0/24;"));
    assert!(!root.join("etc/mysql/mariadb.conf.d/99-foobar-cluster.cnf").exists());
    // Every node by name in /etc/hosts, once, also when node runs again.
    let (code, _, err) = support::agent_command(&["node", "--root", root.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let hosts = read(&root, "etc/hosts");
    assert!(hosts.contains("127.0.0.1 localhost\n"), "{hosts}");
    assert_eq!(hosts.matches("10.88.0.31 db1\n").count(), 1, "{hosts}");
}

#[test]
fn a_db_node_gets_galera_on_its_private_address_and_the_first_one_may_start_the_cluster() {
    for (name, addr, first) in [("db1", "10.88.0.31", true), ("db3", "10.88.0.33", false)] {
        let root = root_with("node-db", &example_description());
        let (code, out, err) = first_boot(&root, &fragment(name, &format!("database-password = \"{PASSWORD}\"\n")));
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(
            active(&root),
            [
                "foobar-backup.timer",
                "foobar-datadir.service",
                "foobar-galera-check.service",
                "foobar-galera-check.socket",
                "mariadb.service"
            ]
        );
        let cnf = read(&root, "etc/mysql/mariadb.conf.d/99-foobar-cluster.cnf");
        for line in [
            format!("bind-address = {addr}"),
            "wsrep_cluster_address = gcomm://10.88.0.31,10.88.0.32,10.88.0.33".to_string(),
            format!("wsrep_node_name = {name}"),
            "wsrep_on = ON".to_string(),
            "pc.recovery=TRUE".to_string(),
            "wsrep_sync_wait = 1".to_string(),
        ] {
            assert!(cnf.contains(&line), "{line} missing:\n{cnf}");
        }
        assert_eq!(root.join("etc/foobar/galera-first").exists(), first, "{name}");
        let peers = read(&root, "etc/foobar/galera-peers");
        assert!(!peers.contains(addr) && peers.lines().count() == 2, "{peers}");
        let users = read(&root, "etc/foobar/cluster-users.sql");
        assert!(
            users.contains("`foobar`@`10.88.0.0/255.255.255.0`") && users.contains(PASSWORD),
            "{users}"
        );
        assert_eq!(mode(&root, "etc/foobar/cluster-users.sql"), 0o600);
        let nft = read(&root, "etc/nftables.conf");
        assert!(
            nft.contains("ip saddr 10.88.0.0/24 tcp dport { 3306, 4444, 4567, 4568, 9200 } accept"),
            "{nft}"
        );
        assert!(
            !nft.contains("80,") && !root.join("etc/haproxy/haproxy.cfg").exists(),
            "{nft}"
        );
    }
}

#[test]
fn an_lb_node_balances_on_readyz_and_holds_the_floating_address_with_its_vrrp_secret() {
    let root = root_with("node-lb", &example_description());
    let (code, out, err) = first_boot(&root, &fragment("lb2", &format!("vrrp-password = \"{VRRP}\"\n")));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(active(&root), ["haproxy.service", "keepalived.service"]);
    let haproxy = read(&root, "etc/haproxy/haproxy.cfg");
    for line in [
        "bind :80",
        "bind :443 ssl crt /etc/foobar/tls/lb.pem alpn h2,http/1.1",
        "use_backend apps_https if { ssl_fc }",
        "http-check send meth GET uri /readyz hdr Host www.foobar.com",
        "server app1 10.88.0.21:80",
        "server app2 10.88.0.22:443 ssl verify none sni ssl_fc_sni track apps_http/app2",
        "server app2-live 10.88.0.22:443 ssl verify none sni ssl_fc_sni backup no-check track apps_live/app2",
        "http-request disable-l7-retry if METH_POST",
        "server app1-live 10.88.0.21:80 backup no-check track apps_live/app1",
        "http-check send meth GET uri /livez hdr Host www.foobar.com",
    ] {
        assert!(haproxy.contains(line), "{line} missing:\n{haproxy}");
    }
    assert!(!haproxy.contains("3306"), "{haproxy}");
    haproxy_accepts(&root);
    let keepalived = read(&root, "etc/keepalived/keepalived.conf");
    assert_eq!(mode(&root, "etc/keepalived/keepalived.conf"), 0o600);
    for line in [
        "10.88.0.10/24",
        "unicast_src_ip 10.88.0.12",
        "        10.88.0.11\n",
        VRRP,
        "priority 253",
    ] {
        assert!(keepalived.contains(line), "{line} missing:\n{keepalived}");
    }
    let nft = read(&root, "etc/nftables.conf");
    assert!(
        nft.contains("tcp dport { 22, 80, 443 } accept") && nft.contains("ip protocol 112"),
        "{nft}"
    );
}

#[test]
fn a_missing_secret_or_a_node_the_description_lacks_fails_first_boot_naming_it() {
    let root = root_with("node-nosecret", &example_description());
    let (code, _, err) = first_boot(&root, "#foobar-config\n[node]\nname = \"lb1\"\n");
    assert_ne!(code, 0);
    assert!(
        err.contains("secrets.vrrp-password") && err.contains("never in the image"),
        "{err}"
    );
    assert!(!root.join("etc/foobar/active").exists(), "no role turned on");

    let root = root_with("node-unknown", &example_description());
    let (code, _, err) = first_boot(&root, "#foobar-config\n[node]\nname = \"web9\"\n");
    assert_ne!(code, 0);
    assert!(err.contains("`web9`") && err.contains("lb1, lb2, db1"), "{err}");

    // A secret that is not one: instance-config names the key, and nothing of the fragment applies.
    let root = root_with("node-badsecret", &example_description());
    let (code, _, err) = first_boot(&root, &fragment("lb1", "vrrp-password = \"far-too-long\"\n"));
    assert_ne!(code, 0);
    assert!(
        err.contains("secrets.vrrp-password") && err.contains("VRRP's limit"),
        "{err}"
    );
    assert!(
        !root.join("etc/foobar/node.toml").exists(),
        "nothing of the bad fragment applies"
    );

    // Outside the description, the image's default role: the one-server stack, no cluster settings.
    let root = root_with("node-outside", &example_description());
    let (code, out, err) = first_boot(&root, "#cloud-config\nhostname: other\n");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("not a node of a cluster description: roles all"), "{out}");
    assert!(active(&root).contains(&"mariadb.service".to_string()));
    assert!(!root.join("etc/haproxy/haproxy.cfg").exists());

    // The hostname names the node when the instance configuration does not.
    let root = root_with("node-hostname", &example_description());
    let (code, out, err) = first_boot(&root, "#cloud-config\nhostname: db2\n");
    assert_ne!(code, 0, "db2 without its secret: {out}");
    assert!(err.contains("secrets.database-password"), "{err}");
}

#[test]
fn a_cluster_description_with_a_mistake_is_refused_naming_the_key() {
    let good = example_description();
    for (change, expected) in [
        (good.replace("10.88.0.0/24", "10.88.0.1/24"), "key `network`"),
        (good.replace("10.88.0.22", "10.88.1.22"), "node `app2`: key `address`"),
        (good.replace("10.88.0.22", "10.88.0.21"), "another node's address"),
        (
            good.replace("floating-address = \"10.88.0.10\"", "floating-address = \"10.88.0.11\""),
            "key `floating-address`",
        ),
        (
            good.replace("floating-address = \"10.88.0.10\"\n", ""),
            "key `floating-address`",
        ),
        (
            good.replace("name = \"db3\"", "name = \"db2\""),
            "`db2` names two nodes",
        ),
        (
            good.replace(
                "roles = [\"lb\"]\naddress = \"10.88.0.12\"",
                "roles = [\"all\"]\naddress = \"10.88.0.12\"",
            ),
            "`all` is the one-server stack",
        ),
        (
            good.replace(
                "roles = [\"db\"]\naddress = \"10.88.0.33\"",
                "roles = [\"app\"]\naddress = \"10.88.0.33\"",
            ),
            "two db nodes",
        ),
        (
            good.replace("roles = [\"lb\"]", "roles = [\"proxy\"]"),
            "unknown variant `proxy`",
        ),
        (
            good.replace("name = \"foobar\"", "name = \"foobar\"\npassword = \"x\""),
            "unknown field `password`",
        ),
    ] {
        let err = format!("{:#}", Description::parse(&change).expect_err(expected));
        assert!(err.contains(expected), "expected {expected}: {err}");
    }
    let d = Description::parse(&good).unwrap();
    assert_eq!(d.nodes.len(), 8);
    assert_eq!(
        d.roles().iter().map(|r| r.name()).collect::<Vec<_>>(),
        ["lb", "app", "db"]
    );
}

#[test]
fn galera_starts_a_new_cluster_only_from_the_node_its_own_files_say_may() {
    let peer = Some("10.88.0.32".parse().unwrap());
    let fresh = State::default();
    let cut_off = State {
        was_member: true,
        safe_to_bootstrap: false,
        view_saved: true,
    };
    let stopped_last = State {
        was_member: true,
        safe_to_bootstrap: true,
        view_saved: false,
    };
    let stopped_earlier = State {
        was_member: true,
        safe_to_bootstrap: false,
        view_saved: false,
    };
    let new = |s: &Start| matches!(s, Start::NewCluster(_));
    // A peer that is Synced in a primary component is always joined, whatever the files say.
    for state in [&fresh, &cut_off, &stopped_last, &stopped_earlier] {
        assert!(!new(&decide(state, true, peer)), "{state:?}");
    }
    assert!(
        new(&decide(&fresh, true, None)),
        "the first db node starts the very first cluster"
    );
    assert!(!new(&decide(&fresh, false, None)), "the others wait for it");
    assert!(
        !new(&decide(&cut_off, true, None)),
        "pc.recovery re-forms a cluster cut off by a power failure"
    );
    assert!(
        new(&decide(&stopped_last, false, None)),
        "the node that stopped last starts it again"
    );
    let both = State {
        view_saved: true,
        ..stopped_last.clone()
    };
    assert!(
        new(&decide(&both, false, None)),
        "stopped last wins over an older saved view"
    );
    assert!(
        !new(&decide(&stopped_earlier, true, None)),
        "a node that stopped earlier would lose the last writes"
    );

    // Galera's own files, as it writes them.
    let dir = support::temp_dir("grastate");
    std::fs::write(
        dir.join("grastate.dat"),
        "# GALERA saved state\nversion: 2.1\nuuid:    5ee99582-bb8d-11e2-b8e3-23de375c1d30\nseqno:   8204503945773\nsafe_to_bootstrap: 1\n",
    )
    .unwrap();
    assert_eq!(State::read(&dir), stopped_last);
    std::fs::write(
        dir.join("grastate.dat"),
        "# GALERA saved state\nversion: 2.1\nuuid:    00000000-0000-0000-0000-000000000000\nseqno:   -1\nsafe_to_bootstrap: 0\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("gvwstate.dat"),
        "my_uuid: c5d5d990-30ee-11e4-aab1-46d0ed84b408\n",
    )
    .unwrap();
    assert_eq!(
        State {
            was_member: false,
            safe_to_bootstrap: false,
            view_saved: true
        },
        State::read(&dir)
    );
}

#[test]
fn an_image_for_a_cluster_holds_every_role_it_names_and_a_bad_cluster_key_names_the_file() {
    use foobar_builder::config::ImageConfig;
    use foobar_builder::roles;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster");
    let config = ImageConfig::load(Some(&dir.join("foobar.toml"))).unwrap();
    assert_eq!(config.roles(), ["all", "app", "db", "lb"]);
    let names: Vec<&str> = roles::resolve(&config.roles(), roles::ROLES)
        .unwrap()
        .iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(
        names,
        ["base", "boot", "access", "firewall", "web", "database", "agent", "balancer", "galera", "cluster"]
    );
    let lb: Vec<&str> = roles::resolve(&["lb".to_string()], roles::ROLES)
        .unwrap()
        .iter()
        .map(|c| c.name)
        .collect();
    assert!(!lb.contains(&"database") && !lb.contains(&"web"), "{lb:?}");

    let scratch = support::temp_dir("cluster-config");
    let file = scratch.join("foobar.toml");
    std::fs::write(&file, "cluster = \"nowhere.toml\"\n").unwrap();
    let err = format!("{:#}", ImageConfig::load(Some(&file)).unwrap_err());
    assert!(
        err.contains(file.to_str().unwrap()) && err.contains("key `cluster`") && err.contains("nowhere.toml"),
        "{err}"
    );
    std::fs::write(
        scratch.join("c.toml"),
        "name = \"x\"\nnetwork = \"10.0.0.0/33\"\n[[node]]\nname = \"a\"\nroles = [\"db\"]\naddress = \"10.0.0.2\"\n",
    )
    .unwrap();
    std::fs::write(&file, "cluster = \"c.toml\"\n").unwrap();
    let err = format!("{:#}", ImageConfig::load(Some(&file)).unwrap_err());
    assert!(err.contains("c.toml") && err.contains("key `network`"), "{err}");
    std::fs::write(&file, "role = []\n").unwrap();
    let err = format!("{:#}", ImageConfig::load(Some(&file)).unwrap_err());
    assert!(
        err.contains("key `role`") || err.contains("a role or a list of roles"),
        "{err}"
    );
}

#[test]
fn a_combined_node_runs_the_lb_on_other_ports_behind_a_redirect_of_the_floating_address() {
    let description = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster-combined/cluster.toml"),
    )
    .unwrap();
    let root = root_with("node-combined", &description);
    let secrets = format!("database-password = \"{PASSWORD}\"\nvrrp-password = \"{VRRP}\"\n");
    let (code, out, err) = first_boot(&root, &fragment("node2", &secrets));
    assert_eq!(code, 0, "{out}{err}");
    let haproxy = read(&root, "etc/haproxy/haproxy.cfg");
    for line in [
        "bind :10080",
        "bind :10443",
        "listen database",
        "server node1 10.89.0.11:80",
    ] {
        assert!(haproxy.contains(line), "{line} missing:\n{haproxy}");
    }
    assert!(!haproxy.contains("bind :80\n"), "{haproxy}");
    haproxy_accepts(&root);
    let nft = read(&root, "etc/nftables.conf");
    for line in [
        "ip daddr 10.89.0.10 tcp dport 80 redirect to :10080",
        "ip daddr 10.89.0.10 tcp dport 443 redirect to :10443",
        "tcp dport { 10080, 10443 } ct status dnat accept",
    ] {
        assert!(nft.contains(line), "{line} missing:\n{nft}");
    }
    let units = active(&root);
    for unit in [
        "haproxy.service",
        "keepalived.service",
        "nginx.service",
        "mariadb.service",
    ] {
        assert!(units.iter().any(|u| u == unit), "{unit} not active: {units:?}");
    }
}

/// A state file of `imagebuild cluster up` with these nodes (name, roles, running), in a new state directory.
fn cluster_state(tag: &str, nodes: &[(&str, &[&str], bool)]) -> PathBuf {
    let dir = support::temp_dir(tag);
    let nodes: Vec<serde_json::Value> = nodes
        .iter()
        .enumerate()
        .map(|(i, (name, roles, running))| {
            serde_json::json!({
                "name": name,
                "roles": roles,
                "address": format!("10.88.0.{}", 11 + i),
                "mac": format!("52:54:00:88:00:{:02x}", 10 + i),
                "tap": format!("tap{i}"),
                // A process that runs (this test's own) stands for a running QEMU; 0 for one that does not.
                "pid": if *running { std::process::id() } else { 0 },
                "monitor": dir.join(format!("{name}.monitor")),
                "serial": dir.join(format!("{name}.serial.log")),
                "memory_mib": 768,
                "image": "/old.qcow2",
            })
        })
        .collect();
    let state = serde_json::json!({
        "name": "foobar",
        "namespace": "foobar-test-none",
        "site": "127.0.0.1:1",
        "site_https": "127.0.0.1:2",
        "target": "10.88.0.10",
        "nodes": nodes,
        "helpers": [],
    });
    std::fs::write(dir.join("state.json"), serde_json::to_string_pretty(&state).unwrap()).unwrap();
    std::fs::write(dir.join("new.qcow2"), b"not booted by this test").unwrap();
    dir
}

fn rollout(dir: &Path, image: &Path) -> (i32, String) {
    rollout_with(dir, image, &[])
}

fn rollout_with(dir: &Path, image: &Path, extra: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(support::binary("imagebuild"))
        .args(["cluster", "rollout", "--image"])
        .arg(image)
        .arg("--state")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_rollout_without_a_free_app_slot_or_over_a_node_with_other_roles_is_refused_and_changes_nothing() {
    // Every app node runs: no slot to boot the first new node in.
    let dir = cluster_state(
        "rollout-full",
        &[
            ("lb1", &["lb"], true),
            ("app1", &["app"], true),
            ("app2", &["app"], true),
        ],
    );
    let before = std::fs::read(dir.join("state.json")).unwrap();
    let (code, err) = rollout(&dir, &dir.join("new.qcow2"));
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("every app node runs (app1, app2)") && err.contains("cluster stop app2"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.join("state.json")).unwrap(),
        before,
        "the state changed"
    );
    assert!(!dir.join("app1.qcow2").exists() && !dir.join("app2.qcow2").exists());

    // A node that is lb, app and db at once (the combined layout) is not the rollout's to replace.
    let dir = cluster_state(
        "rollout-combined",
        &[
            ("node1", &["lb", "app", "db"], true),
            ("node2", &["lb", "app", "db"], false),
        ],
    );
    let (code, err) = rollout(&dir, &dir.join("new.qcow2"));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("node `node1` is lb+app+db"), "{err}");

    // No such image; no cluster at all.
    let (code, err) = rollout(&dir, &dir.join("missing.qcow2"));
    assert_ne!(code, 0);
    assert!(err.contains("missing.qcow2: no such image"), "{err}");
    let empty = support::temp_dir("rollout-none");
    std::fs::write(empty.join("new.qcow2"), b"x").unwrap();
    let (code, err) = rollout(&empty, &empty.join("new.qcow2"));
    assert_ne!(code, 0);
    assert!(err.contains("no cluster is up here"), "{err}");
}

#[test]
fn a_rollout_of_the_db_nodes_needs_every_one_synced_and_on_a_data_disk_and_changes_nothing_otherwise() {
    let nodes: &[(&str, &[&str], bool)] = &[
        ("app1", &["app"], true),
        ("db1", &["db"], false),
        ("db2", &["db"], true),
    ];
    // Nodes of a cluster brought up before db nodes had data disks.
    let dir = cluster_state("rollout-db-no-disk", nodes);
    let before = std::fs::read(dir.join("state.json")).unwrap();
    let (code, err) = rollout_with(&dir, &dir.join("new.qcow2"), &["--role", "db"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("db node `db1` has no data disk"), "{err}");
    assert_eq!(std::fs::read(dir.join("state.json")).unwrap(), before);

    // With data disks, but db1 is off: no db node is taken out of a cluster that is not whole.
    let text = String::from_utf8(before).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
    for node in state["nodes"].as_array_mut().unwrap() {
        if node["roles"][0] == "db" {
            let disk = dir.join(format!("{}.data.qcow2", node["name"].as_str().unwrap()));
            node["data_disk"] = serde_json::json!(disk);
        }
    }
    let text = serde_json::to_string_pretty(&state).unwrap();
    std::fs::write(dir.join("state.json"), &text).unwrap();
    let (code, err) = rollout_with(&dir, &dir.join("new.qcow2"), &["--role", "db"]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("db node `db1` is not running") && err.contains("only while every db node is Synced"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(dir.join("state.json")).unwrap(), text);
    assert!(!dir.join("db1.qcow2.before-rollout").exists() && !dir.join("db2.qcow2.before-rollout").exists());

    // A node that is db and something else; a role a rollout does not replace.
    let dir = cluster_state("rollout-db-combined", &[("node1", &["lb", "app", "db"], true)]);
    let (code, err) = rollout_with(&dir, &dir.join("new.qcow2"), &["--role", "db"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("node `node1` is lb+app+db"), "{err}");
    let (code, err) = rollout_with(&dir, &dir.join("new.qcow2"), &["--role", "lb"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("--role") && err.contains("lb"), "{err}");
}

#[test]
fn the_galera_check_answers_draining_from_sigterm_for_its_drain_time_then_exits() {
    let port = support::free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let mut check = std::process::Command::new(support::binary("foobar-agent"))
        .args(["galera-check", "--listen", &format!("127.0.0.1:{port}")])
        // No MariaDB there: the check answers 503 with MariaDB's error.
        .args(["--database-url", "mysql://root@127.0.0.1:1/"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let before = loop {
        if let Ok(reply) = support::get(&url) {
            break reply;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "galera-check never answered on {url}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(before.status, 503);
    assert!(before.body.starts_with("not synced: MariaDB"), "{}", before.body);

    let term = std::process::Command::new("kill")
        .args(["-TERM", &check.id().to_string()])
        .status();
    assert!(term.unwrap().success());
    let sent = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let during = support::get(&url).expect("galera-check answers while it drains");
    assert_eq!(during.status, 503);
    assert_eq!(during.body, "not synced: draining (this node is stopping)\n");
    let status = loop {
        if let Some(status) = check.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < foobar_agent::galera::DRAIN * 3,
            "galera-check still runs after its drain"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let took = sent.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= foobar_agent::galera::DRAIN - std::time::Duration::from_millis(200),
        "it stopped answering after {took:?}, before its drain time"
    );
}
