//! `web`: nginx in front. Our site only, on 80 and 443, for the canonical name (the bare domain redirects to it);
//! static files from the web root, the agent's routes (or the site's own app's) proxied; TLS with the operator's
//! certificate or the self-signed one each instance makes at first boot. The site and the proxy snippet are
//! rendered from `nginx/` with the typed variables below.

use std::os::unix::fs::symlink;
use std::path::Path;

use anyhow::{bail, Context as _};
use serde::Serialize;

use super::{enable, write, Component};
use crate::config::ImageConfig;
use crate::context::{Context, Port, SiteEntry, SiteTree};
use crate::process::{cmd, Tool};
use crate::util::sha256_file;

pub const COMPONENT: Component = Component {
    name: "web",
    // openssl makes the self-signed certificate at first boot; logrotate bounds nginx's logs; uacme gets and renews
    // certificates from an ACME CA when `[acme]` is on (ca-certificates: the CAs it trusts).
    packages: &["nginx-light", "openssl", "logrotate", "uacme", "ca-certificates"],
    instance_files: &["etc/foobar/tls/key.pem", "etc/foobar/tls/cert.pem"],
    // The image's own nginx tests the rendered site in the image's root (`check_nginx`).
    host_tools: &[Tool {
        program: "chroot",
        package: "coreutils",
    }],
    ports: &[
        Port {
            number: 80,
            what: "HTTP",
        },
        Port {
            number: 443,
            what: "HTTPS",
        },
    ],
    install,
    ..super::NOTHING
};

const SITE: &str = include_str!("../../../nginx/site.conf.tera");
const PROXY: &str = include_str!("../../../nginx/proxy.conf.tera");

/// Where first boot puts the self-signed certificate when the config names no real one.
pub const DEFAULT_TLS_CERTIFICATE: &str = "/etc/foobar/tls/cert.pem";
pub const DEFAULT_TLS_KEY: &str = "/etc/foobar/tls/key.pem";
/// Written by first boot (the operator's certificate) or `foobar-agent acme` (an issued one) once the certificate in
/// place is trusted, removed when a self-signed one stands in; the agent and first boot use the same paths.
pub const HTTPS_ONLY: &str = "/etc/foobar/tls/https-only.conf";
pub const ACME_WEBROOT: &str = "/var/lib/foobar/acme/webroot";

/// Paths and settings the nginx site needs.
#[derive(Debug, Serialize)]
pub struct SiteVars {
    pub domain: String,
    pub canonical: String,
    pub web_root: String,
    pub agent_socket: String,
    /// Exact paths proxied to the agent.
    pub agent_exact: Vec<String>,
    /// Path prefixes proxied to the agent.
    pub agent_prefixes: Vec<String>,
    /// Where the proxy snippet (`proxy`) is installed.
    pub proxy_conf: String,
    pub tls_certificate: String,
    pub tls_key: String,
    /// Present once a trusted certificate is (`set $foobar_trusted 1;`): HTTP then redirects and HSTS is sent.
    pub https_only: String,
    /// Where the ACME challenges are served from (`/.well-known/acme-challenge/` below it).
    pub acme_webroot: String,
    /// Sustained POSTs per second per client address, and the burst allowed above it; beyond: 429.
    pub write_rate: u32,
    pub write_burst: u32,
    /// Health requests (`agent_exact`) per second per client address, and the burst above it; beyond: 429. Load
    /// balancers ask a few times a second; a flood does not reach the agent.
    pub health_rate: u32,
    pub health_burst: u32,
    /// Largest request body (nginx size syntax); beyond: 413.
    pub body_limit: String,
    /// `Name "value"` pairs added to every answer of the canonical site.
    pub security_headers: Vec<String>,
    pub posts_csp: String,
    /// The built-in posts app's routes (`/posts`, `/api/`) are served; false when the site runs its own app.
    pub builtin_app: bool,
    /// The site's own app server (`unix:/path` or `127.0.0.1:PORT`, nginx syntax); empty: none.
    pub app_upstream: String,
    /// Path prefixes proxied to the app; `/` is every path that is not a file in the web root.
    pub app_routes: Vec<String>,
    /// `error_page` arguments for the static files: the site's own `404.html` (also for a directory without an
    /// index, which nginx forbids) and `50x.html`, when it has them.
    pub error_pages: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ProxyVars {
    pub connect_timeout: u32,
}

impl SiteVars {
    pub fn for_site(domain: &str, canonical: &str) -> SiteVars {
        SiteVars {
            domain: domain.to_string(),
            canonical: canonical.to_string(),
            web_root: "/var/www/foobar".to_string(),
            agent_socket: crate::config::AGENT_SOCKET.to_string(),
            agent_exact: ["/livez", "/readyz", "/healthz"].map(String::from).to_vec(),
            agent_prefixes: vec!["/api/".to_string()],
            proxy_conf: "/etc/nginx/foobar-proxy.conf".to_string(),
            tls_certificate: DEFAULT_TLS_CERTIFICATE.to_string(),
            tls_key: DEFAULT_TLS_KEY.to_string(),
            https_only: HTTPS_ONLY.to_string(),
            acme_webroot: ACME_WEBROOT.to_string(),
            write_rate: 5,
            write_burst: 20,
            health_rate: 20,
            health_burst: 40,
            body_limit: "64k".to_string(),
            security_headers: vec![
                "X-Content-Type-Options \"nosniff\"".to_string(),
                "Referrer-Policy \"strict-origin-when-cross-origin\"".to_string(),
                "X-Frame-Options \"DENY\"".to_string(),
                // Empty (so not sent) until a trusted certificate is in place, and never over HTTP.
                "Strict-Transport-Security $foobar_hsts".to_string(),
            ],
            posts_csp: "default-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'".to_string(),
            builtin_app: true,
            app_upstream: String::new(),
            app_routes: Vec::new(),
            error_pages: Vec::new(),
        }
    }

    /// The site's own error pages, for the ones its files include.
    pub fn with_error_pages(mut self, has: impl Fn(&str) -> bool) -> SiteVars {
        if has("404.html") {
            // A directory without index.html (nginx's 403, never a listing) looks like any missing page.
            self.error_pages.push("403 404 =404 /404.html".to_string());
        }
        if has("50x.html") {
            self.error_pages.push("500 502 503 504 /50x.html".to_string());
        }
        self
    }

    /// The site with its own app server at `upstream` (nginx syntax) for `routes`, instead of the built-in app.
    pub fn with_app(mut self, upstream: &str, routes: &[String]) -> SiteVars {
        self.builtin_app = false;
        self.agent_prefixes.clear();
        self.app_upstream = upstream.to_string();
        self.app_routes = routes.to_vec();
        self
    }
}

/// The site file (`/etc/nginx/sites-enabled/foobar`).
pub fn site(vars: &SiteVars) -> anyhow::Result<String> {
    crate::render::render("nginx/site.conf.tera", SITE, vars)
}

/// The proxy snippet (`/etc/nginx/foobar-proxy.conf`).
pub fn proxy(vars: &ProxyVars) -> anyhow::Result<String> {
    crate::render::render("nginx/proxy.conf.tera", PROXY, vars)
}

/// The site's variables as the plan sets them: its names, its own app if any, the operator's certificate if any.
pub fn site_vars(ctx: &Context) -> SiteVars {
    let mut site = SiteVars::for_site(&ctx.config.site.domain, &ctx.config.site.canonical);
    if let Some(app) = &ctx.config.app {
        site = site.with_app(&app.address(), &app.routes);
    }
    if !ctx.config.site.tls_certificate.is_empty() {
        site.tls_certificate = ctx.config.site.tls_certificate.clone();
        site.tls_key = ctx.config.site.tls_key.clone();
    }
    if let Some(tree) = &ctx.site {
        site = site.with_error_pages(|path| tree.has_file(path));
    }
    site
}

/// The real `nginx -t`, by the image's own nginx in a chroot of the image's root, on the configuration as installed.
/// nginx loads the certificate, which first boot (or the operator) puts in place later: a throwaway one stands in
/// for the test. Whatever the test made (that certificate, its directories, log files) is removed after, so the image
/// is as if it had not run.
fn check_nginx(root: &Path, vars: &SiteVars) -> anyhow::Result<()> {
    use std::collections::BTreeSet;
    let in_root = |path: &str| root.join(path.trim_start_matches('/'));
    let listing =
        |dirs: &[std::path::PathBuf]| -> BTreeSet<std::path::PathBuf> { dirs.iter().flat_map(|d| walk(d)).collect() };
    // nginx -t opens its logs, makes its temp directories and an empty pid file.
    let watched = [
        root.join("var/log/nginx"),
        root.join("var/lib/nginx"),
        root.join("run"),
        root.join("tmp"),
        in_root(&vars.tls_certificate)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        in_root(&vars.tls_key)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    ];
    // The first missing ancestor of each certificate path: removed after, with all the test made below it.
    let mut made_dirs = Vec::new();
    for path in [&vars.tls_certificate, &vars.tls_key] {
        let mut top = None;
        let mut dir = in_root(path).parent().map(Path::to_path_buf);
        while let Some(d) = dir.filter(|d| !d.exists()) {
            top = Some(d.clone());
            dir = d.parent().map(Path::to_path_buf);
        }
        made_dirs.extend(top);
    }
    let before = listing(&watched);
    let result = (|| -> anyhow::Result<()> {
        if !in_root(&vars.tls_certificate).exists() || !in_root(&vars.tls_key).exists() {
            for path in [&vars.tls_certificate, &vars.tls_key] {
                if let Some(dir) = in_root(path).parent() {
                    std::fs::create_dir_all(dir)?;
                }
            }
            cmd("chroot")
                .arg(root)
                .args([
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-days", "1", "-subj", "/CN=nginx-t", "-keyout"])
                .arg(&vars.tls_key)
                .arg("-out")
                .arg(&vars.tls_certificate)
                .run()
                .context("cannot make the stand-in certificate for nginx -t")?;
        }
        cmd("chroot")
            .arg(root)
            .args(["nginx", "-t", "-q"])
            .run()
            .context("nginx -t refused the site's rendered configuration (etc/nginx/sites-available/foobar)")
    })();
    let after = listing(&watched);
    let made: Vec<&std::path::PathBuf> = after.difference(&before).collect();
    for path in made.into_iter().rev() {
        let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir(path));
    }
    for dir in made_dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// Every path under `dir` (itself excluded), files and directories.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// `value` as one shell word: single-quoted, a quote inside written as `'\\''`.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

fn install(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    // nginx's own unit neither waits for the network to be online nor tests its configuration before each start
    // (imagebuild ran `nginx -t` on it already).
    write(
        root,
        "etc/systemd/system/nginx.service",
        include_str!("../../../image/systemd/nginx.service"),
        0o644,
    )?;
    let vars = site_vars(ctx);
    let self_signed = ctx.config.site.tls_certificate.is_empty();
    // Sourced by first boot's shell as root: every value single-quoted (and the config allows no quote in them).
    let env = [
        ("DOMAIN", ctx.config.site.domain.as_str()),
        ("CANONICAL", ctx.config.site.canonical.as_str()),
        ("TLS_CERTIFICATE", vars.tls_certificate.as_str()),
        ("TLS_KEY", vars.tls_key.as_str()),
        ("TLS_SELF_SIGNED", if self_signed { "yes" } else { "no" }),
        ("HTTPS_ONLY", HTTPS_ONLY),
        ("ACME", if ctx.config.acme.enabled { "yes" } else { "no" }),
        ("ACME_DIRECTORY", ctx.config.acme.directory.as_str()),
        ("ACME_EMAIL", ctx.config.acme.email.as_str()),
        ("ACME_RENEW_DAYS", &ctx.config.acme.renew_days.to_string()),
    ]
    .iter()
    .map(|(key, value)| format!("{key}={}\n", shell_quote(value)))
    .collect::<String>();
    write(
        root,
        "etc/foobar/site.env",
        format!("# What first boot needs to know about the site (written by imagebuild).\n{env}"),
        0o644,
    )?;
    write(root, "etc/nginx/sites-available/foobar", site(&vars)?, 0o644)?;
    // The TLS protocols and ciphers are the site file's, for every server block: Debian's nginx.conf sets wider
    // ones at the same level, which nginx would refuse as a duplicate.
    let conf_path = root.join("etc/nginx/nginx.conf");
    let conf = std::fs::read_to_string(&conf_path).context("cannot read the image's etc/nginx/nginx.conf")?;
    let conf: String = conf
        .lines()
        .map(|line| {
            let directive = line.trim_start();
            if directive.starts_with("ssl_protocols ") || directive.starts_with("ssl_prefer_server_ciphers ") {
                format!("\t# {directive} (foobar: set in sites-available/foobar)\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    write(root, "etc/nginx/nginx.conf", conf, 0o644)?;
    // Certificates from an ACME CA: issued at boot once nginx serves the challenges, renewed twice a day.
    for (path, text, mode) in [
        (
            "etc/systemd/system/foobar-acme.service",
            include_str!("../../../image/systemd/foobar-acme.service"),
            0o644,
        ),
        (
            "etc/systemd/system/foobar-acme.timer",
            include_str!("../../../image/systemd/foobar-acme.timer"),
            0o644,
        ),
        (
            "usr/lib/foobar/acme-hook",
            include_str!("../../../image/files/acme-hook"),
            0o755,
        ),
    ] {
        write(root, path, text, mode)?;
    }
    for (unit, target) in [
        ("foobar-acme.service", "multi-user.target"),
        ("foobar-acme.timer", "timers.target"),
    ] {
        enable(root, unit, &format!("/etc/systemd/system/{unit}"), target)?;
    }
    write(
        root,
        "etc/nginx/foobar-proxy.conf",
        proxy(&ProxyVars { connect_timeout: 5 })?,
        0o644,
    )?;
    // nginx's logs stay bounded: rotated by size, checked every 5 minutes (a day of a flood would fill the disk).
    write(
        root,
        "etc/logrotate.d/nginx",
        include_str!("../../../image/files/logrotate-nginx"),
        0o644,
    )?;
    write(
        root,
        "etc/systemd/system/logrotate.timer.d/foobar.conf",
        "[Timer]\n# foobar: every 5 minutes, so that size limits hold (Debian: daily).\nOnCalendar=\nOnCalendar=*:0/5\n\
         AccuracySec=30s\nRandomizedDelaySec=0\n",
        0o644,
    )?;
    let _ = std::fs::remove_file(root.join("etc/nginx/sites-enabled/default"));
    let enabled = root.join("etc/nginx/sites-enabled/foobar");
    let _ = std::fs::remove_file(&enabled);
    symlink("/etc/nginx/sites-available/foobar", &enabled)?;
    match &ctx.site {
        Some(tree) => install_site(tree, &root.join("var/www/foobar"))?,
        None => {
            write(
                root,
                "var/www/foobar/index.html",
                include_str!("../../../image/site/index.html"),
                0o644,
            )?;
            write(
                root,
                "var/www/foobar/static/site.css",
                include_str!("../../../image/site/static/site.css"),
                0o644,
            )?;
        }
    }
    check_nginx(root, &vars)?;
    Ok(())
}

/// The part of the disk the system takes (the stack is about 700 MiB, plus room to run); the rest may hold the site.
const SYSTEM_MIB: u64 = 1024;

/// Checks `site.root` and lists what will be copied. Dot-files and dot-directories are left out (`.git`, `.env`),
/// except `.well-known`; a symbolic link is copied as the file it names, which must be inside the directory.
pub fn scan_site(config: &ImageConfig) -> anyhow::Result<Option<SiteTree>> {
    let Some(root) = &config.site.root else {
        return Ok(None);
    };
    if !root.is_dir() {
        bail!(
            "key `site.root`: expected a directory of the site's static files, but {} is not one \
             (a relative path is taken from the config file's directory)",
            root.display()
        );
    }
    let real_root = root
        .canonicalize()
        .with_context(|| format!("key `site.root`: cannot resolve {}", root.display()))?;
    let mut tree = SiteTree {
        root: root.clone(),
        entries: Vec::new(),
    };
    scan_dir(root, &real_root, "", &mut tree)?;
    let serves_root = config.app.as_ref().is_some_and(|a| a.routes.iter().any(|r| r == "/"));
    if !tree.has_file("index.html") && !serves_root {
        bail!(
            "key `site.root`: {} has no index.html, the page for `/` (add one, or let an [app] serve `/`)",
            root.display()
        );
    }
    let budget = config.disk.size_mib.saturating_sub(SYSTEM_MIB) << 20;
    if tree.bytes() > budget {
        bail!(
            "key `site.root`: the site's files in {} take {:.1} MiB, more than the {} MiB that `disk.size-mib` = {} \
             leaves beside the system (about {SYSTEM_MIB} MiB); raise disk.size-mib",
            root.display(),
            tree.bytes() as f64 / (1 << 20) as f64,
            budget >> 20,
            config.disk.size_mib
        );
    }
    Ok(Some(tree))
}

fn scan_dir(dir: &Path, real_root: &Path, prefix: &str, tree: &mut SiteTree) -> anyhow::Result<()> {
    for entry in crate::util::sorted_entries(dir).with_context(|| "key `site.root`".to_string())? {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(String::from) else {
            bail!(
                "key `site.root`: {}: the name is not UTF-8, so no URL can name it; rename it",
                path.display()
            );
        };
        if name.chars().any(|c| c.is_control() || c == '\\') {
            bail!(
                "key `site.root`: {:?}: a name with control characters or a backslash cannot be served as a URL path; rename it",
                path.display()
            );
        }
        if name.starts_with('.') && name != ".well-known" {
            tracing::info!(path = %path.display(), "site.root: dot-file left out of the image (never served)");
            continue;
        }
        let rel = format!("{prefix}{name}");
        let meta = path.symlink_metadata()?;
        let source = if meta.file_type().is_symlink() {
            let target = path.canonicalize().ok().filter(|t| t.starts_with(real_root));
            match target {
                Some(t) if t.is_file() => t,
                Some(_) => bail!(
                    "key `site.root`: {} is a symbolic link to a directory; put the directory itself there",
                    path.display()
                ),
                None => bail!(
                    "key `site.root`: {} is a symbolic link that leaves the site directory (or names nothing): {}",
                    path.display(),
                    std::fs::read_link(&path)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default()
                ),
            }
        } else if meta.is_dir() {
            tree.entries.push(SiteEntry {
                path: rel.clone(),
                source: None,
                sha256: String::new(),
                bytes: 0,
            });
            scan_dir(&path, real_root, &format!("{rel}/"), tree)?;
            continue;
        } else if meta.is_file() {
            path.clone()
        } else {
            bail!(
                "key `site.root`: {} is not a regular file or directory (a socket, FIFO or device)",
                path.display()
            );
        };
        let sha256 = sha256_file(&source)
            .map_err(|err| anyhow::anyhow!("key `site.root`: {} cannot be read: {:#}", path.display(), err))?;
        tree.entries.push(SiteEntry {
            path: rel,
            bytes: std::fs::metadata(&source)?.len(),
            source: Some(source),
            sha256,
        });
    }
    Ok(())
}

/// Copies the checked site into the web root: directories 0755, files 0644, all root's.
fn install_site(tree: &SiteTree, web_root: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(web_root)?;
    for entry in &tree.entries {
        let dest = web_root.join(&entry.path);
        match &entry.source {
            None => {
                std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
            }
            Some(source) => {
                std::fs::copy(source, &dest)
                    .with_context(|| format!("key `site.root`: cannot copy {}", source.display()))?;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644))?;
            }
        }
    }
    Ok(())
}
