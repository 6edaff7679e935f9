//! The metadata services' HTTP client: bounded time per request, bounded time in all, never a redirect.
//!
//! Two kinds of failure are retried, each the way the services document it:
//! - no connection (the network is still coming up at first boot): every 250 ms for up to 20 s;
//! - an answer that says "later": 410 (Azure IMDS while the VM starts, for up to 70 s), 429 (throttled: EC2, GCE and
//!   Azure all limit request rates) and 5xx (EC2 and GCE answer 503 when throttling, Azure 500 on a passing
//!   fault). These back off from 0.5 s, doubling to 8 s (or the `Retry-After` the service sent, up to 30 s), for as
//!   long as the client's budget lasts.
//!
//! Any other status is the answer: 404 means "not there"; the rest is an error naming the request and the status.

use std::time::{Duration, Instant};

use anyhow::bail;

/// Each request: connect and answer within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPTS: u32 = 3;
/// How long to wait for the network (DHCP) before the first request can go out, on a detected cloud.
const NETWORK_WAIT: Duration = Duration::from_secs(20);
/// How long first boot keeps asking a service that answers "later": past Azure's 70 s of 410s after start, well
/// inside the first-boot unit's 300 s.
pub const FIRST_BOOT_BUDGET: Duration = Duration::from_secs(120);
/// Backoff after a "later" answer: first, and at most.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
const RETRY_AFTER_MAX: Duration = Duration::from_secs(30);
/// Answers larger than this are refused (user data is at most 16 KiB on EC2, 256 KiB on GCE, 64 KiB on Azure).
const MAX_BODY: u64 = 1 << 20;

pub struct Http {
    agent: ureq::Agent,
    started: Instant,
    budget: Duration,
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

/// Whether a status means "ask again later".
pub fn retryable(status: u16) -> bool {
    status == 410 || status == 429 || (500..=599).contains(&status)
}

impl Http {
    pub fn new() -> Http {
        Http::with_budget(FIRST_BOOT_BUDGET)
    }

    /// A client that retries "later" answers for up to `budget` from its creation.
    pub fn with_budget(budget: Duration) -> Http {
        Http {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(REQUEST_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .redirects(0)
                .build(),
            started: Instant::now(),
            budget,
        }
    }

    /// What is left of the budget.
    pub fn remaining(&self) -> Duration {
        self.budget.saturating_sub(self.started.elapsed())
    }

    /// Sends until an answer arrives (see the module's comment for what is retried). `Ok(None)` is a 404.
    pub fn send_bytes(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let mut attempt = 0;
        let mut backoff = BACKOFF_FIRST;
        loop {
            attempt += 1;
            let mut request = self.agent.request(method, url);
            for (name, value) in headers {
                request = request.set(name, value);
            }
            let result = match body {
                Some(body) => request.send_string(body),
                None => request.call(),
            };
            match result {
                Ok(response) => return read_body(response, method, url).map(Some),
                Err(ureq::Error::Status(404, _)) => return Ok(None),
                Err(ureq::Error::Status(code, response)) if retryable(code) => {
                    let asked = response
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(RETRY_AFTER_MAX));
                    let pause = asked.unwrap_or(backoff);
                    if pause > self.remaining() {
                        let text = response.into_string().unwrap_or_default();
                        bail!(
                            "{method} {url}: {code} {} (still answering {code} after {:.0} s of retries)",
                            excerpt(&text),
                            self.started.elapsed().as_secs_f64()
                        );
                    }
                    tracing::info!(%url, status = code, retry_in = ?pause, attempt, "metadata service says later; retrying");
                    std::thread::sleep(pause);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(ureq::Error::Status(code, response)) => {
                    let text = response.into_string().unwrap_or_default();
                    bail!("{method} {url}: {code} {}", excerpt(&text));
                }
                Err(err) => {
                    // The network may still be coming up: keep trying for a while, then give up.
                    let waited = self.started.elapsed();
                    if attempt >= ATTEMPTS && waited >= NETWORK_WAIT {
                        bail!("{method} {url}: {err}");
                    }
                    let pause = if waited < NETWORK_WAIT { 250 } else { 500 };
                    tracing::debug!(%url, error = %err, attempt, "metadata request failed; retrying");
                    std::thread::sleep(Duration::from_millis(pause));
                }
            }
        }
    }

    /// As `send_bytes`, the answer read as text (invalid UTF-8 replaced).
    pub fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> anyhow::Result<Option<String>> {
        Ok(self
            .send_bytes(method, url, headers, body)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Option<String>> {
        self.send("GET", url, headers, None)
    }

    pub fn get_bytes(&self, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Option<Vec<u8>>> {
        self.send_bytes("GET", url, headers, None)
    }
}

fn read_body(response: ureq::Response, method: &str, url: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut body = Vec::new();
    response.into_reader().take(MAX_BODY + 1).read_to_end(&mut body)?;
    if body.len() as u64 > MAX_BODY {
        bail!("{method} {url}: the answer is larger than {MAX_BODY} bytes");
    }
    Ok(body)
}

fn excerpt(text: &str) -> String {
    text.chars().take(200).collect()
}
