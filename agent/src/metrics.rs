//! Prometheus counters for `/metrics`: requests by route and status, a latency histogram, pool use, schema version.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Default)]
pub struct Metrics {
    /// Route → status → count; looked up by the route's `&str`, so a counted request allocates nothing.
    requests: Mutex<BTreeMap<String, BTreeMap<u16, u64>>>,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Pool and schema figures read at scrape time.
pub struct Gauges {
    pub pool_size: u32,
    pub pool_idle: usize,
    pub pool_max: u32,
    pub migration_version: i64,
    /// The read cache's counters (`cache.rs`).
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_invalidations: u64,
    pub readiness_checks: u64,
}

impl Metrics {
    pub fn record(&self, route: &str, status: u16, elapsed: Duration) {
        {
            let mut requests = self.requests.lock().expect("metrics lock");
            match requests.get_mut(route) {
                Some(by_status) => *by_status.entry(status).or_default() += 1,
                None => {
                    requests.insert(route.to_string(), BTreeMap::from([(status, 1)]));
                }
            }
        }
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP foobar_http_requests_total HTTP requests answered, by route and status.\n");
        out.push_str("# TYPE foobar_http_requests_total counter\n");
        for (route, status, n) in self
            .requests
            .lock()
            .expect("metrics lock")
            .iter()
            .flat_map(|(route, by_status)| by_status.iter().map(move |(status, n)| (route, status, n)))
        {
            let _ = writeln!(
                out,
                "foobar_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP foobar_http_request_duration_seconds Time to answer an HTTP request.\n");
        out.push_str("# TYPE foobar_http_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "foobar_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "foobar_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "foobar_http_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "foobar_http_request_duration_seconds_count {count}");
        out.push_str("# HELP foobar_db_pool_connections Database connections held by the pool, by state.\n");
        out.push_str("# TYPE foobar_db_pool_connections gauge\n");
        let idle = gauges.pool_idle as u32;
        let _ = writeln!(out, "foobar_db_pool_connections{{state=\"idle\"}} {idle}");
        let _ = writeln!(
            out,
            "foobar_db_pool_connections{{state=\"in_use\"}} {}",
            gauges.pool_size.saturating_sub(idle)
        );
        out.push_str("# HELP foobar_db_pool_max_connections Largest number of connections the pool opens.\n");
        out.push_str("# TYPE foobar_db_pool_max_connections gauge\n");
        let _ = writeln!(out, "foobar_db_pool_max_connections {}", gauges.pool_max);
        out.push_str("# HELP foobar_migration_version Schema version applied (0 until migrations ran).\n");
        out.push_str("# TYPE foobar_migration_version gauge\n");
        let _ = writeln!(out, "foobar_migration_version {}", gauges.migration_version);
        for (name, help, value) in [
            (
                "foobar_read_cache_hits_total",
                "Posts reads answered from the read cache.",
                gauges.cache_hits,
            ),
            (
                "foobar_read_cache_misses_total",
                "Posts reads that asked the database.",
                gauges.cache_misses,
            ),
            (
                "foobar_read_cache_invalidations_total",
                "Writes on this node that emptied the read cache.",
                gauges.cache_invalidations,
            ),
            (
                "foobar_readiness_checks_total",
                "Readiness checks run (database ping, app check): at most one per second for the health endpoints.",
                gauges.readiness_checks,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        out
    }
}
