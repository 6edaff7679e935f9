//! The HTTP side of the smoke suite: one ureq agent that sends every request to the instance under test,
//! whatever name it asks for, and TLS that checks the certificate's names even when trust is waived.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// How much of a body the checks keep: enough for any page they inspect, bounded for a hostile server.
const BODY_LIMIT: u64 = 4 * 1024 * 1024;

/// An answer, kept whatever its status.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The media type without parameters (`text/html; charset=utf-8` → `text/html`).
    pub fn media_type(&self) -> &str {
        self.header("content-type")
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
    }

    /// The status and the first bytes of the body, for messages that say what came back.
    pub fn summary(&self) -> String {
        let mut head: String = self.body.chars().take(160).collect();
        head = head.split_whitespace().collect::<Vec<_>>().join(" ");
        if self.body.chars().count() > 160 {
            head.push_str("...");
        }
        if head.is_empty() {
            format!("{} (empty body)", self.status)
        } else {
            format!("{}: {head}", self.status)
        }
    }
}

/// Which addresses a name connects to: `--resolve` pins first; then either everything to the URL's address
/// (when the URL names an address, or for names that only exist for the test) or the system resolver.
#[derive(Debug, Clone)]
pub struct Routing {
    pub pinned: HashMap<String, IpAddr>,
    /// The URL's own addresses; used for every name when the URL is an address.
    pub target: Vec<IpAddr>,
    pub target_is_address: bool,
    /// Names that only exist for the test (the unknown Host) go to the target too.
    pub synthetic: Vec<String>,
    /// How every other name is resolved.
    pub resolver: super::dns::Resolver,
}

impl ureq::Resolver for Routing {
    fn resolve(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        let (host, port) = netloc
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?)))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad address {netloc}")))?;
        if let Some(ip) = self.pinned.get(&host.to_ascii_lowercase()) {
            return Ok(vec![SocketAddr::new(*ip, port)]);
        }
        if self.target_is_address || self.synthetic.iter().any(|s| s.eq_ignore_ascii_case(host)) {
            return Ok(self.target.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        match self.resolver {
            super::dns::Resolver::System => Ok(netloc.to_socket_addrs()?.collect()),
            resolver => Ok(resolver
                .lookup(host)
                .map_err(|err| io::Error::new(io::ErrorKind::NotFound, err))?
                .addresses
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()),
        }
    }
}

/// Checks the certificate chain against the web's roots, or (with `--insecure`) only that it names the host.
#[derive(Debug)]
struct Verifier {
    trusted: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.trusted {
            Some(verifier) => verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
            None => {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&cert, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(insecure: bool) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let trusted = if insecure {
        None
    } else {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Some(WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider)).build()?)
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier { trusted, provider }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends requests; never follows redirects (they are what some checks look at).
pub struct Client {
    agent: ureq::Agent,
}

impl Client {
    pub fn new(routing: Routing, insecure: bool, timeout: Duration) -> anyhow::Result<Client> {
        let agent = ureq::AgentBuilder::new()
            .resolver(routing)
            .tls_config(tls_config(insecure)?)
            .timeout_connect(timeout)
            .timeout(timeout)
            .redirects(0)
            .user_agent(concat!("imagebuild-smoke/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client { agent })
    }

    /// One request; `Err` only when no answer came back (connection, TLS, timeout), described for a person.
    pub fn send(&self, method: &str, url: &str, content_type: Option<&str>, body: &[u8]) -> Result<Reply, String> {
        self.send_within(method, url, content_type, body, None)
    }

    fn send_within(
        &self,
        method: &str,
        url: &str,
        content_type: Option<&str>,
        body: &[u8],
        limit: Option<Duration>,
    ) -> Result<Reply, String> {
        let mut request = self.agent.request(method, url);
        if let Some(limit) = limit {
            request = request.timeout(limit);
        }
        if let Some(kind) = content_type {
            request = request.set("Content-Type", kind);
        }
        let result = if body.is_empty() && method == "GET" {
            request.call()
        } else {
            request.send_bytes(body)
        };
        let response = match result {
            Ok(response) | Err(ureq::Error::Status(_, response)) => response,
            Err(ureq::Error::Transport(transport)) => return Err(describe(method, url, &transport)),
        };
        let status = response.status();
        let headers = response
            .headers_names()
            .into_iter()
            .flat_map(|name| {
                response
                    .all(&name)
                    .into_iter()
                    .map(|v| (name.clone(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(BODY_LIMIT)
            .read_to_end(&mut bytes)
            .map_err(|err| format!("{method} {url}: reading the body: {err}"))?;
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    pub fn get(&self, url: &str) -> Result<Reply, String> {
        self.send("GET", url, None, &[])
    }

    /// A GET that gives up after `limit`: for polling a machine that is still booting, where a connection made too
    /// early can hang (QEMU's user network accepts it before the guest listens) and must not hold up the next try.
    pub fn get_within(&self, url: &str, limit: Duration) -> Result<Reply, String> {
        self.send_within("GET", url, None, &[], Some(limit))
    }
}

fn describe(method: &str, url: &str, transport: &ureq::Transport) -> String {
    let mut text = transport.kind().to_string();
    if let Some(message) = transport.message() {
        text = format!("{text}: {message}");
    }
    let mut source = std::error::Error::source(transport);
    while let Some(err) = source {
        let more = err.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = err.source();
    }
    if text.contains("invalid peer certificate") && !text.contains("NotValidForName") {
        text.push_str(" (the certificate is not signed by a trusted authority; the image's own is self-signed until you install one: pass --insecure to check only that it names the site)");
    }
    if text.contains("Unexpected EOF") {
        text.push_str(" (the server closed the connection without answering: does it serve this name? see --host)");
    }
    format!("{method} {url}: no answer: {text}")
}
