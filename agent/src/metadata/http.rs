//! The metadata services' HTTP client: bounded time per request, bounded attempts, never a redirect.

use std::time::{Duration, Instant};

use anyhow::bail;

/// Each request: connect and answer within this, tried this many times.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPTS: u32 = 3;
/// How long to wait for the network (DHCP) before the first request can go out, on a detected cloud.
const NETWORK_WAIT: Duration = Duration::from_secs(20);

pub struct Http {
    agent: ureq::Agent,
    started: Instant,
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(REQUEST_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .redirects(0)
                .build(),
            started: Instant::now(),
        }
    }

    /// Sends until an HTTP answer arrives. Connection errors are retried (quickly at first, while DHCP finishes);
    /// an HTTP status is an answer. `Ok(None)` is a 404.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> anyhow::Result<Option<String>> {
        let mut attempt = 0;
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
                Ok(response) => return Ok(Some(response.into_string()?)),
                Err(ureq::Error::Status(404, _)) => return Ok(None),
                Err(ureq::Error::Status(code, response)) => {
                    let text = response.into_string().unwrap_or_default();
                    bail!("{method} {url}: {code} {}", text.chars().take(200).collect::<String>());
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

    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Option<String>> {
        self.send("GET", url, headers, None)
    }
}
