//! Rendering the nginx templates in `nginx/` from typed structs (an unknown variable is an error), and the agent's
//! configuration file.

use anyhow::Context as _;
use serde::Serialize;

const SITE: &str = include_str!("../../nginx/site.conf.tera");
const PROXY: &str = include_str!("../../nginx/proxy.conf.tera");

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
            agent_socket: "/run/foobar/agent.sock".to_string(),
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

/// The agent's `[app]` table as the image's `agent.toml` carries it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentApp {
    pub name: String,
    pub command: Vec<String>,
    pub listen: String,
    pub directory: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    pub env: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct AgentConfig<'a> {
    listen: &'a str,
    database_url: &'a str,
    first_boot_marker: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    migrations: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app: Option<&'a AgentApp>,
}

/// `/etc/foobar/agent.toml`: socket-activated, MariaDB over its socket with unix_socket auth, ready after first boot;
/// with an app, its migrations replace the built-in ones and the agent runs it.
pub fn agent_config(app: Option<(&AgentApp, &str)>) -> anyhow::Result<String> {
    let config = AgentConfig {
        listen: "unix:/run/foobar/agent.sock",
        database_url: "mysql://foobar@localhost/foobar?socket=/run/mysqld/mysqld.sock",
        first_boot_marker: "/var/lib/foobar/first-boot.done",
        migrations: app.map(|(_, migrations)| migrations),
        app: app.map(|(app, _)| app),
    };
    let text = toml::to_string(&config).context("cannot write the agent's configuration")?;
    Ok(format!(
        "# foobar-agent in the image (written by imagebuild; see README.md, \"The agent\").\n{text}"
    ))
}

fn render(name: &str, template: &str, vars: &impl Serialize) -> anyhow::Result<String> {
    let mut tera = tera::Tera::default();
    tera.autoescape_on(vec![]);
    tera.add_raw_template(name, template)
        .with_context(|| format!("template nginx/{name} does not parse"))?;
    let context = tera::Context::from_serialize(vars).context("template variables")?;
    tera.render(name, &context).map_err(|err| {
        // Tera keeps the useful part (the unknown variable) in the source chain.
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        anyhow::anyhow!("cannot render nginx/{name}: {message}")
    })
}

/// The site file (`/etc/nginx/sites-enabled/foobar`).
pub fn site(vars: &SiteVars) -> anyhow::Result<String> {
    render("site.conf.tera", SITE, vars)
}

/// The proxy snippet (`/etc/nginx/foobar-proxy.conf`).
pub fn proxy(vars: &ProxyVars) -> anyhow::Result<String> {
    render("proxy.conf.tera", PROXY, vars)
}
