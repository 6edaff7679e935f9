//! `imagebuild smoke URL`: the checks users run against any deployment, and the ones our end-to-end tests use.
//! `Target::plan` turns the flags into where and as whom to ask; `run` runs every check in order and returns a
//! `Report` that `report.rs` prints as text, JSON or JUnit.

mod checks;
pub mod client;
pub mod dns;
pub mod report;

use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use client::{Client, Routing};

/// The site name asked for when the URL is an address and `--host` is not given: the image's default.
pub const DEFAULT_HOST: &str = "www.foobar.com";
/// A Host no site answers for; `.invalid` never resolves anywhere (RFC 2606).
pub const UNKNOWN_HOST: &str = "smoke-unknown-host.invalid";

#[derive(Debug, Clone)]
pub struct Options {
    pub url: String,
    pub host: Option<String>,
    pub resolve: Vec<(String, IpAddr)>,
    pub https_port: Option<u16>,
    pub insecure: bool,
    pub timeout: Duration,
    pub wait: Option<Duration>,
    pub read_only: bool,
    /// Resolve names by asking this DNS server instead of the system's resolver.
    pub dns_server: Option<std::net::SocketAddr>,
}

impl Options {
    pub fn new(url: &str) -> Options {
        Options {
            url: url.to_string(),
            host: None,
            resolve: Vec::new(),
            https_port: None,
            insecure: false,
            timeout: Duration::from_secs(10),
            wait: None,
            read_only: false,
            dns_server: None,
        }
    }
}

/// Where the checks connect and which names they ask for, resolved once from the options.
#[derive(Debug, Clone)]
pub struct Target {
    pub scheme: &'static str,
    pub port: u16,
    pub https_port: u16,
    /// The site's own name (`Host` and TLS server name of most checks).
    pub canonical: String,
    /// The name that must redirect to `canonical`: the bare domain, or `www.` + a bare canonical name.
    pub other: String,
    pub routing: Routing,
}

impl Target {
    pub fn plan(options: &Options) -> anyhow::Result<Target> {
        let url = &options.url;
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
            ("http", rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            ("https", rest)
        } else {
            bail!("URL `{url}` must start with http:// or https://");
        };
        let authority = rest.split('/').next().unwrap_or("");
        if rest[authority.len()..].trim_start_matches('/').contains(|c| c != '/') {
            bail!("URL `{url}` must not have a path: the checks choose their own paths");
        }
        let (host, port) =
            split_authority(authority).with_context(|| format!("URL `{url}` has no usable host[:port]"))?;
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = port.unwrap_or(default_port);
        // Plain HTTP on a non-standard port is `imagebuild boot --port N`, whose HTTPS is N+1.
        let https_port = options.https_port.unwrap_or(match (scheme, port) {
            ("https", p) => p,
            (_, 80) => 443,
            (_, p) => p
                .checked_add(1)
                .context("the URL's port leaves no room for HTTPS at port+1")?,
        });
        let address: Option<IpAddr> = host.parse().ok();
        let canonical = options
            .host
            .clone()
            .or_else(|| address.is_none().then(|| host.to_string()))
            .unwrap_or_else(|| DEFAULT_HOST.to_string())
            .to_ascii_lowercase();
        if canonical.is_empty() || canonical.parse::<IpAddr>().is_ok() {
            bail!("--host must be the site's DNS name (like www.foobar.com), got `{canonical}`");
        }
        let other = match canonical.strip_prefix("www.") {
            Some(bare) => bare.to_string(),
            None => format!("www.{canonical}"),
        };
        let pinned: HashMap<String, IpAddr> = options
            .resolve
            .iter()
            .map(|(name, ip)| (name.to_ascii_lowercase(), *ip))
            .collect();
        let resolver = match options.dns_server {
            Some(server) => dns::Resolver::Server(server),
            None => dns::Resolver::System,
        };
        let target = match (address, pinned.get(&host.to_ascii_lowercase())) {
            (Some(ip), _) | (None, Some(&ip)) => vec![ip],
            (None, None) => match resolver {
                dns::Resolver::System => (host, port)
                    .to_socket_addrs()
                    .with_context(|| format!("cannot resolve `{host}` from {url}"))?
                    .map(|a| a.ip())
                    .collect(),
                dns::Resolver::Server(_) => {
                    resolver
                        .lookup(host)
                        .map_err(|err| anyhow::anyhow!("cannot resolve `{host}` from {url}: {err}"))?
                        .addresses
                }
            },
        };
        Ok(Target {
            scheme,
            port,
            https_port,
            canonical,
            other,
            routing: Routing {
                pinned,
                target,
                target_is_address: address.is_some(),
                synthetic: vec![UNKNOWN_HOST.to_string()],
                resolver,
            },
        })
    }

    /// A URL that asks `name` for `path` over the URL's scheme and port.
    pub fn url(&self, name: &str, path: &str) -> String {
        format!("{}://{name}:{}{path}", self.scheme, self.port)
    }

    pub fn https_url(&self, name: &str, path: &str) -> String {
        format!("https://{name}:{}{path}", self.https_port)
    }
}

fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.contains('@') || authority.is_empty() {
        return None;
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host, Some(port.parse().ok()?))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    Fail(String),
    Skip(String),
}

#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: &'static str,
    pub outcome: Outcome,
    pub duration: Duration,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub url: String,
    pub host: String,
    pub results: Vec<CheckResult>,
    pub duration: Duration,
}

impl Report {
    pub fn count(&self, want: fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| want(&r.outcome)).count()
    }

    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Pass(_)))
    }

    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Fail(_)))
    }

    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skip(_)))
    }

    pub fn ok(&self) -> bool {
        self.failed() == 0
    }
}

/// Runs every check in order; each line is also handed to `progress` as soon as it is known.
pub fn run(options: &Options, mut progress: impl FnMut(&CheckResult)) -> anyhow::Result<Report> {
    let target = Target::plan(options)?;
    let client = Client::new(target.routing.clone(), options.insecure, options.timeout)?;
    let started = Instant::now();
    let mut suite = checks::Suite::new(&client, &target, options);
    let mut results = Vec::new();
    let wait = options.wait.map(|_| &checks::WAIT_READY);
    for check in wait.into_iter().chain(checks::CHECKS) {
        let begun = Instant::now();
        let outcome = if suite.unreachable {
            Outcome::Skip(format!("nothing answers at {}", options.url))
        } else if check.writes && options.read_only {
            Outcome::Skip("read-only".to_string())
        } else {
            (check.run)(&mut suite)
        };
        let result = CheckResult {
            name: check.name,
            outcome,
            duration: begun.elapsed(),
        };
        progress(&result);
        results.push(result);
    }
    Ok(Report {
        url: options.url.clone(),
        host: target.canonical.clone(),
        results,
        duration: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("127.0.0.1:8080"), Some(("127.0.0.1", Some(8080))));
        assert_eq!(split_authority("[::1]:8080"), Some(("::1", Some(8080))));
        assert_eq!(split_authority("www.foobar.com"), Some(("www.foobar.com", None)));
        assert_eq!(split_authority("host:port"), None);
        assert_eq!(split_authority(""), None);
    }
}
