//! The checks, in the order they run. Each asks one question of the site and, when the answer is wrong, says what
//! it expected and what came back. Later checks may use what earlier ones found (the page, the written post); when
//! that is missing they are skipped, so one fault fails one check.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::client::{Client, Reply};
use super::{Options, Outcome, Target, UNKNOWN_HOST};

pub struct Check {
    pub name: &'static str,
    /// Writes to the site's data; skipped with `--read-only`.
    pub writes: bool,
    pub run: fn(&mut Suite) -> Outcome,
}

/// Runs first, and only with `--wait`.
pub const WAIT_READY: Check = Check {
    name: "wait-ready",
    writes: false,
    run: wait_ready,
};

pub const CHECKS: &[Check] = &[
    Check {
        name: "dns",
        writes: false,
        run: dns,
    },
    Check {
        name: "connect",
        writes: false,
        run: connect,
    },
    Check {
        name: "static-page",
        writes: false,
        run: static_page,
    },
    Check {
        name: "static-asset",
        writes: false,
        run: static_asset,
    },
    Check {
        name: "redirect-to-canonical",
        writes: false,
        run: redirect,
    },
    Check {
        name: "unknown-host",
        writes: false,
        run: unknown_host,
    },
    Check {
        name: "livez",
        writes: false,
        run: livez,
    },
    Check {
        name: "readyz",
        writes: false,
        run: readyz,
    },
    Check {
        name: "healthz",
        writes: false,
        run: healthz,
    },
    Check {
        name: "api-write",
        writes: true,
        run: api_write,
    },
    Check {
        name: "api-read",
        writes: false,
        run: api_read,
    },
    Check {
        name: "page-write",
        writes: true,
        run: page_write,
    },
    Check {
        name: "page-read",
        writes: false,
        run: page_read,
    },
    Check {
        name: "https",
        writes: false,
        run: https,
    },
    Check {
        name: "security-headers",
        writes: false,
        run: security_headers,
    },
    Check {
        name: "body-limit",
        writes: false,
        run: body_limit,
    },
];

/// A body the image refuses (its limit is 64 KiB), and that is not JSON, so a site without the limit answers 400
/// and stores nothing.
const OVERSIZED_BODY: usize = 256 * 1024;
const SECURITY_HEADERS: &[(&str, Option<&str>)] = &[
    ("x-content-type-options", Some("nosniff")),
    ("x-frame-options", None),
    ("referrer-policy", None),
];

pub struct Suite<'a> {
    client: &'a Client,
    target: &'a Target,
    wait: Option<Duration>,
    timeout: Duration,
    url: String,
    /// Unique per run, so repeated runs never find each other's rows.
    marker: String,
    page: Option<Reply>,
    post_id: Option<u64>,
    page_written: Option<String>,
    /// The name of the site's own app server when `/healthz` reports one: the built-in posts app is not there.
    own_app: Option<String>,
    /// Set when nothing listens at the URL: the remaining checks are skipped, not failed one by one.
    pub unreachable: bool,
}

impl<'a> Suite<'a> {
    pub fn new(client: &'a Client, target: &'a Target, options: &Options) -> Suite<'a> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Suite {
            client,
            target,
            wait: options.wait,
            timeout: options.timeout,
            url: options.url.clone(),
            marker: format!("smoke-{nanos:x}-{}", std::process::id()),
            page: None,
            post_id: None,
            page_written: None,
            own_app: None,
            unreachable: false,
        }
    }

    fn site(&self, path: &str) -> String {
        self.target.url(&self.target.canonical, path)
    }

    fn get(&self, path: &str) -> Result<(String, Reply), String> {
        let url = self.site(path);
        let reply = self.client.get(&url)?;
        Ok((url, reply))
    }
}

fn expect_status(url: &str, reply: &Reply, want: u16) -> Result<(), String> {
    if reply.status == want {
        Ok(())
    } else {
        Err(format!("{url}: expected {want}, got {}", reply.summary()))
    }
}

fn expect_type(url: &str, reply: &Reply, want: &str) -> Result<(), String> {
    if reply.media_type().eq_ignore_ascii_case(want) {
        Ok(())
    } else {
        Err(format!(
            "{url}: expected Content-Type {want}, got `{}`",
            reply.header("content-type").unwrap_or("(none)")
        ))
    }
}

fn json_body(url: &str, reply: &Reply) -> Result<Value, String> {
    serde_json::from_str(&reply.body).map_err(|err| format!("{url}: expected JSON, got {} ({err})", reply.summary()))
}

fn outcome(result: Result<String, String>) -> Outcome {
    match result {
        Ok(detail) => Outcome::Pass(detail),
        Err(message) => Outcome::Fail(message),
    }
}

/// Both names resolve, to the same addresses: the apex's A/AAAA records and `www` (a CNAME to the apex, or the same
/// records). Skipped when the URL is an address, or for a name `--resolve` pins (nothing of DNS is used then).
fn dns(s: &mut Suite) -> Outcome {
    let routing = &s.target.routing;
    if routing.target_is_address {
        return Outcome::Skip("the URL is an address: no DNS names to check".into());
    }
    let names = [s.target.canonical.as_str(), s.target.other.as_str()];
    if let Some(pinned) = names.iter().find(|n| routing.pinned.contains_key(**n)) {
        return Outcome::Skip(format!("--resolve pins {pinned}: DNS not checked"));
    }
    let mut found = Vec::new();
    for name in names {
        match routing.resolver.lookup(name) {
            Ok(lookup) => found.push((name, lookup)),
            Err(err) => {
                return Outcome::Fail(format!(
                    "{err}; both {} and {} must resolve to the site (an A/AAAA record for the apex, `www` a CNAME \
                     to it)",
                    names[0], names[1]
                ))
            }
        }
    }
    let seen = found
        .iter()
        .map(|(name, lookup)| format!("{name} → {}", lookup.describe()))
        .collect::<Vec<_>>()
        .join("; ");
    if found[0].1.addresses != found[1].1.addresses {
        return Outcome::Fail(format!(
            "the names resolve to different addresses: {seen}; point both at the same server (an A/AAAA record for \
             the apex, `www` a CNAME to it)"
        ));
    }
    Outcome::Pass(seen)
}

fn wait_ready(s: &mut Suite) -> Outcome {
    let limit = s.wait.unwrap_or_default();
    let started = Instant::now();
    let url = s.site("/readyz");
    let mut last: String;
    loop {
        match s.client.get_within(&url, s.timeout.min(POLL_TIMEOUT)) {
            Ok(reply) if reply.status == 200 => {
                return Outcome::Pass(format!("ready after {:.1} s", started.elapsed().as_secs_f64()));
            }
            Ok(reply) => last = reply.summary(),
            Err(err) => last = err,
        }
        if started.elapsed() >= limit {
            return Outcome::Fail(format!(
                "{url}: not 200 within {} s; last answer: {last}",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// How long one `/readyz` poll of `--wait` may take before the next one is sent.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// A TCP connection to the URL's address, so a wrong address fails at once with one clear message.
fn connect(s: &mut Suite) -> Outcome {
    let port = s.target.port;
    let mut errors = Vec::new();
    for ip in &s.target.routing.target {
        let addr = std::net::SocketAddr::new(*ip, port);
        match std::net::TcpStream::connect_timeout(&addr, s.timeout) {
            Ok(_) => return Outcome::Pass(format!("connected to {addr}")),
            Err(err) => errors.push(format!("{addr}: {err}")),
        }
    }
    s.unreachable = true;
    Outcome::Fail(format!("cannot connect to {} ({})", s.url, errors.join("; ")))
}

fn static_page(s: &mut Suite) -> Outcome {
    outcome((|| {
        let (url, reply) = s.get("/")?;
        expect_status(&url, &reply, 200)?;
        expect_type(&url, &reply, "text/html")?;
        if !reply.body.to_ascii_lowercase().contains("<html") {
            return Err(format!("{url}: expected an HTML document, got {}", reply.summary()));
        }
        let detail = format!("200 text/html, {} bytes", reply.body.len());
        s.page = Some(reply);
        Ok(detail)
    })())
}

/// The first file of the site the landing page loads (a stylesheet, script, image or icon: `href="..."` or
/// `src="..."`), as a path on the site: `/static/site.css`, `/css/app.3f9a2b1c.css`, `img/logo.svg` → `/img/logo.svg`.
/// Links to other pages, anchors and other sites are passed over.
fn first_asset(page: &str) -> Option<String> {
    let lower = page.to_ascii_lowercase();
    let mut found: Vec<(usize, String)> = Vec::new();
    for attr in ["href=", "src="] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(attr).map(|i| from + i + attr.len()) {
            from = at;
            let rest = &page[at..];
            let (quote, rest) = match rest.chars().next() {
                Some(q @ ('"' | '\'')) => (q, &rest[1..]),
                _ => continue,
            };
            let Some(end) = rest.find(quote) else { continue };
            let value = rest[..end].split(['?', '#']).next().unwrap_or("").trim();
            let page_like = value.is_empty()
                || value == "/"
                || value.ends_with('/')
                || value.ends_with(".html")
                || value.ends_with(".htm");
            if page_like || value.starts_with("//") || value.contains(':') {
                continue;
            }
            let path = if value.starts_with('/') {
                value.to_string()
            } else {
                format!("/{}", value.trim_start_matches("./"))
            };
            found.push((at, path));
            break;
        }
    }
    found.into_iter().min_by_key(|(at, _)| *at).map(|(_, path)| path)
}

fn static_asset(s: &mut Suite) -> Outcome {
    let Some(page) = &s.page else {
        return Outcome::Skip("needs static-page".to_string());
    };
    let Some(path) = first_asset(&page.body) else {
        return Outcome::Fail(
            "the landing page loads no file of the site (a stylesheet, script or image: href=\"...\" or src=\"...\")"
                .to_string(),
        );
    };
    outcome((|| {
        let (url, reply) = s.get(&path)?;
        expect_status(&url, &reply, 200)?;
        if reply.media_type().is_empty() || reply.media_type() == "text/html" {
            return Err(format!(
                "{url}: expected the asset's own Content-Type, got `{}`",
                reply.header("content-type").unwrap_or("(none)")
            ));
        }
        let cache = reply.header("cache-control").unwrap_or("");
        let max_age = cache
            .split(',')
            .filter_map(|part| part.trim().strip_prefix("max-age="))
            .find_map(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if max_age == 0 || reply.header("expires").is_none() {
            return Err(format!(
                "{url}: expected caching headers (Cache-Control max-age > 0 and Expires), got Cache-Control `{cache}`, Expires `{}`",
                reply.header("expires").unwrap_or("(none)")
            ));
        }
        Ok(format!("{path}: {}, max-age={max_age}", reply.media_type()))
    })())
}

fn redirect(s: &mut Suite) -> Outcome {
    outcome((|| {
        let path = "/smoke/redirect?check=1";
        let url = s.target.url(&s.target.other, path);
        let reply = s.client.get(&url)?;
        if reply.status != 301 && reply.status != 308 {
            return Err(format!(
                "{url}: expected a permanent redirect (301 or 308), got {}",
                reply.summary()
            ));
        }
        let location = reply.header("location").unwrap_or("(none)");
        let expected = format!("{}://{}", s.target.scheme, s.target.canonical);
        // The port may be given or not: behind port forwarding the public port is not the one asked.
        let rest = location.strip_prefix(&expected).map(|r| {
            r.strip_prefix(':')
                .map_or(r, |r| r.trim_start_matches(|c: char| c.is_ascii_digit()))
        });
        if rest != Some(path) {
            return Err(format!("{url}: expected Location {expected}{path}, got `{location}`"));
        }
        Ok(format!("{} → {location}", reply.status))
    })())
}

fn unknown_host(s: &mut Suite) -> Outcome {
    let url = s.target.url(UNKNOWN_HOST, "/");
    match s.client.get(&url) {
        Err(_) => Outcome::Pass("closed without an answer".to_string()),
        Ok(reply) if (200..300).contains(&reply.status) => Outcome::Fail(format!(
            "{url}: expected no site for an unknown Host (no answer or 4xx), got {}",
            reply.summary()
        )),
        Ok(reply) => Outcome::Pass(format!("answered {}", reply.status)),
    }
}

fn livez(s: &mut Suite) -> Outcome {
    outcome((|| {
        let (url, reply) = s.get("/livez")?;
        expect_status(&url, &reply, 200)?;
        Ok("200".to_string())
    })())
}

fn readyz(s: &mut Suite) -> Outcome {
    outcome((|| {
        let (url, reply) = s.get("/readyz")?;
        expect_status(&url, &reply, 200)?;
        Ok("200".to_string())
    })())
}

/// The health document's shape (status, version, checks per component) and every check passing.
fn healthz(s: &mut Suite) -> Outcome {
    outcome((|| {
        let (url, reply) = s.get("/healthz")?;
        // Even a failing document says whether the site runs its own app.
        s.own_app = serde_json::from_str(&reply.body).ok().and_then(|doc| own_app(&doc));
        expect_status(&url, &reply, 200)?;
        expect_type(&url, &reply, "application/health+json")?;
        let doc = json_body(&url, &reply)?;
        let field = |name: &str| {
            doc.get(name)
                .ok_or_else(|| format!("{url}: the health document has no `{name}`: {}", reply.summary()))
        };
        let status = field("status")?;
        if status != "pass" {
            return Err(format!("{url}: expected \"status\": \"pass\", got {status}"));
        }
        if !field("version")?.is_string() {
            return Err(format!("{url}: expected `version` to be a string: {}", reply.summary()));
        }
        let components = field("checks")?.as_object().filter(|c| !c.is_empty()).ok_or_else(|| {
            format!(
                "{url}: expected `checks` to be an object with one entry per component: {}",
                reply.summary()
            )
        })?;
        for (name, entries) in components {
            let entries = entries
                .as_array()
                .ok_or_else(|| format!("{url}: check `{name}` must be a list of results, got {entries}"))?;
            for entry in entries {
                if entry.get("status") != Some(&json!("pass")) {
                    return Err(format!("{url}: check `{name}` is not passing: {entry}"));
                }
            }
        }
        let names: Vec<&str> = components.keys().map(String::as_str).collect();
        Ok(format!("pass: {}", names.join(", ")))
    })())
}

/// The `componentId` of a check with `"componentType": "app"`: the agent runs the site's own app server.
fn own_app(health: &Value) -> Option<String> {
    health.get("checks")?.as_object()?.values().find_map(|entries| {
        let entry = entries.get(0)?;
        (entry.get("componentType")? == "app").then(|| entry.get("componentId")?.as_str().map(String::from))?
    })
}

/// The posts checks exercise the built-in app; a site that runs its own app (seen by `healthz`) skips them.
fn skip_without_builtin_app(s: &Suite) -> Option<Outcome> {
    s.own_app.as_ref().map(|app| {
        Outcome::Skip(format!(
            "the site runs its own app `{app}` (per /healthz); this check is for the built-in posts app"
        ))
    })
}

fn api_write(s: &mut Suite) -> Outcome {
    if let Some(skip) = skip_without_builtin_app(s) {
        return skip;
    }
    outcome((|| {
        let url = s.site("/api/posts");
        let body = format!("{} via the API", s.marker);
        let request = json!({ "author": "imagebuild smoke", "body": body }).to_string();
        let reply = s
            .client
            .send("POST", &url, Some("application/json"), request.as_bytes())?;
        expect_status(&url, &reply, 201)?;
        let post = json_body(&url, &reply)?;
        let id = post.get("id").and_then(Value::as_u64).ok_or_else(|| {
            format!(
                "{url}: expected the stored post with a numeric `id`, got {}",
                reply.summary()
            )
        })?;
        if post.get("body") != Some(&json!(body)) {
            return Err(format!(
                "{url}: expected the stored post to echo body `{body}`, got {}",
                reply.summary()
            ));
        }
        s.post_id = Some(id);
        Ok(format!("201, post {id}"))
    })())
}

fn api_read(s: &mut Suite) -> Outcome {
    if let Some(skip) = skip_without_builtin_app(s) {
        return skip;
    }
    outcome((|| {
        let (url, reply) = s.get("/api/posts?limit=20")?;
        expect_status(&url, &reply, 200)?;
        expect_type(&url, &reply, "application/json")?;
        let list = json_body(&url, &reply)?;
        let posts = list
            .as_array()
            .ok_or_else(|| format!("{url}: expected a JSON list of posts, got {}", reply.summary()))?;
        let Some(id) = s.post_id else {
            return Ok(format!("{} posts listed", posts.len()));
        };
        let (one_url, one) = s.get(&format!("/api/posts/{id}"))?;
        expect_status(&one_url, &one, 200)?;
        if !one.body.contains(&s.marker) {
            return Err(format!(
                "{one_url}: expected the post written by api-write, got {}",
                one.summary()
            ));
        }
        if !posts.iter().any(|p| p.get("id").and_then(Value::as_u64) == Some(id)) {
            return Err(format!(
                "{url}: expected post {id} (written by api-write) among the newest, got {}",
                reply.summary()
            ));
        }
        Ok(format!("post {id} read back and listed"))
    })())
}

fn page_write(s: &mut Suite) -> Outcome {
    if let Some(skip) = skip_without_builtin_app(s) {
        return skip;
    }
    outcome((|| {
        let url = s.site("/posts");
        let body = format!("{} via the page", s.marker);
        let form = format!("author=imagebuild+smoke&body={}", body.replace(' ', "+"));
        let reply = s
            .client
            .send("POST", &url, Some("application/x-www-form-urlencoded"), form.as_bytes())?;
        if reply.status != 303 {
            return Err(format!("{url}: expected 303 back to the page, got {}", reply.summary()));
        }
        s.page_written = Some(body);
        Ok(format!("303 → {}", reply.header("location").unwrap_or("(no Location)")))
    })())
}

fn page_read(s: &mut Suite) -> Outcome {
    if let Some(skip) = skip_without_builtin_app(s) {
        return skip;
    }
    outcome((|| {
        let (url, reply) = s.get("/posts")?;
        expect_status(&url, &reply, 200)?;
        expect_type(&url, &reply, "text/html")?;
        if !reply.body.contains("<form") {
            return Err(format!("{url}: expected the page's form, got {}", reply.summary()));
        }
        if let Some(written) = &s.page_written {
            if !reply.body.contains(written.as_str()) {
                return Err(format!(
                    "{url}: expected the post written by page-write (`{written}`), got {}",
                    reply.summary()
                ));
            }
            return Ok("200 text/html with the written post".to_string());
        }
        Ok("200 text/html".to_string())
    })())
}

fn https(s: &mut Suite) -> Outcome {
    outcome((|| {
        let url = s.target.https_url(&s.target.canonical, "/");
        let reply = s.client.get(&url)?;
        expect_status(&url, &reply, 200)?;
        Ok(format!("certificate valid for {}, 200", s.target.canonical))
    })())
}

fn security_headers(s: &mut Suite) -> Outcome {
    let Some(page) = &s.page else {
        return Outcome::Skip("needs static-page".to_string());
    };
    let url = s.site("/");
    let mut problems = Vec::new();
    match page.header("server") {
        Some(server) if server.chars().any(|c| c.is_ascii_digit()) => {
            problems.push(format!("Server `{server}` reveals a version"));
        }
        _ => {}
    }
    for (name, value) in SECURITY_HEADERS {
        match (page.header(name), value) {
            (None, _) => problems.push(format!("{name} missing")),
            (Some(got), Some(want)) if !got.eq_ignore_ascii_case(want) => {
                problems.push(format!("{name} is `{got}`, expected `{want}`"));
            }
            _ => {}
        }
    }
    if problems.is_empty() {
        Outcome::Pass(format!(
            "Server `{}`, {} headers",
            page.header("server").unwrap_or("(none)"),
            SECURITY_HEADERS.len()
        ))
    } else {
        Outcome::Fail(format!("{url}: {}", problems.join("; ")))
    }
}

fn body_limit(s: &mut Suite) -> Outcome {
    outcome((|| {
        let url = s.site("/api/posts");
        let body = vec![b'x'; OVERSIZED_BODY];
        let reply = s.client.send("POST", &url, Some("application/json"), &body)?;
        if reply.status != 413 {
            return Err(format!(
                "{url}: expected 413 for a {} KiB body, got {}",
                OVERSIZED_BODY / 1024,
                reply.summary()
            ));
        }
        Ok(format!("413 for {} KiB", OVERSIZED_BODY / 1024))
    })())
}

#[cfg(test)]
mod tests {
    use super::first_asset;

    #[test]
    fn the_first_static_reference_is_the_asset() {
        let page = r#"<link rel="stylesheet" href="/static/site.css"><img src='/static/a.png'>"#;
        assert_eq!(first_asset(page).as_deref(), Some("/static/site.css"));
        assert_eq!(first_asset("<p>none</p>"), None);
        // A site of its own: pages, anchors and other sites are passed over; relative paths are from the root.
        let page = r##"<a href="/about.html">About</a><a href="#top">top</a><link href="https://cdn.example/x.css">
            <a href="/blog/">Blog</a><link rel="icon" href="img/logo.3f9a2b1c.svg?v=2"><script src="/js/app.mjs">"##;
        assert_eq!(first_asset(page).as_deref(), Some("/img/logo.3f9a2b1c.svg"));
        assert_eq!(
            first_asset(r#"<a href="/">home</a><a href="//cdn.example/a.js">"#),
            None
        );
    }
}
