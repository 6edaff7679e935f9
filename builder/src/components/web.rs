//! `web`: nginx in front. Our site only, on 80 and 443, for the canonical name (the bare domain redirects to it);
//! static files from the web root, the agent's routes (or the site's own app's) proxied; TLS with the operator's
//! certificate or the self-signed one each instance makes at first boot. The site and the proxy snippet are
//! rendered from `nginx/` with the typed variables below.

use std::os::unix::fs::symlink;
use std::path::Path;

use serde::Serialize;

use super::{write, Component};
use crate::context::{Context, Port};

pub const COMPONENT: Component = Component {
    name: "web",
    // openssl makes the self-signed certificate at first boot.
    packages: &["nginx-light", "openssl"],
    config_packages: super::no_config_packages,
    dpkg_rules: &[],
    late_excludes: &[],
    layer_hooks: &[],
    host_tools: &[],
    instance_files: &["etc/foobar/tls/key.pem", "etc/foobar/tls/cert.pem"],
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
};

const SITE: &str = include_str!("../../../nginx/site.conf.tera");
const PROXY: &str = include_str!("../../../nginx/proxy.conf.tera");

/// Where first boot puts the self-signed certificate when the config names no real one.
pub const DEFAULT_TLS_CERTIFICATE: &str = "/etc/foobar/tls/cert.pem";
pub const DEFAULT_TLS_KEY: &str = "/etc/foobar/tls/key.pem";

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
    /// Sustained POSTs per second per client address, and the burst allowed above it; beyond: 429.
    pub write_rate: u32,
    pub write_burst: u32,
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
            write_rate: 5,
            write_burst: 20,
            body_limit: "64k".to_string(),
            security_headers: vec![
                "X-Content-Type-Options \"nosniff\"".to_string(),
                "Referrer-Policy \"strict-origin-when-cross-origin\"".to_string(),
                "X-Frame-Options \"DENY\"".to_string(),
            ],
            posts_csp: "default-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'".to_string(),
            builtin_app: true,
            app_upstream: String::new(),
            app_routes: Vec::new(),
        }
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
    site
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
    write(
        root,
        "etc/foobar/site.env",
        format!(
            "# What first boot needs to know about the site (written by imagebuild).\nDOMAIN={}\nCANONICAL={}\n\
             TLS_CERTIFICATE={}\nTLS_KEY={}\nTLS_SELF_SIGNED={}\n",
            ctx.config.site.domain,
            ctx.config.site.canonical,
            vars.tls_certificate,
            vars.tls_key,
            if self_signed { "yes" } else { "no" }
        ),
        0o644,
    )?;
    write(root, "etc/nginx/sites-available/foobar", site(&vars)?, 0o644)?;
    write(
        root,
        "etc/nginx/foobar-proxy.conf",
        proxy(&ProxyVars { connect_timeout: 5 })?,
        0o644,
    )?;
    let _ = std::fs::remove_file(root.join("etc/nginx/sites-enabled/default"));
    let enabled = root.join("etc/nginx/sites-enabled/foobar");
    let _ = std::fs::remove_file(&enabled);
    symlink("/etc/nginx/sites-available/foobar", &enabled)?;
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
    Ok(())
}
