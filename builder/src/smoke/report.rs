//! How a smoke run is printed: a line per check for people, JSON and JUnit XML for CI systems.

use std::fmt::Write as _;

use serde_json::json;

use super::{CheckResult, Outcome, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Junit,
}

/// One line for one check: status, name, duration, then what it found or what went wrong.
pub fn line(result: &CheckResult) -> String {
    let (word, detail) = match &result.outcome {
        Outcome::Pass(d) => ("pass", d),
        Outcome::Fail(d) => ("FAIL", d),
        Outcome::Skip(d) => ("skip", d),
    };
    format!(
        "{word}  {:<22} {:>6} ms  {detail}",
        result.name,
        result.duration.as_millis()
    )
}

pub fn summary(report: &Report) -> String {
    let mut text = format!("{} passed, {} failed", report.passed(), report.failed());
    if report.skipped() > 0 {
        let _ = write!(text, ", {} skipped", report.skipped());
    }
    let _ = write!(text, " ({:.1} s)", report.duration.as_secs_f64());
    text
}

pub fn json(report: &Report) -> String {
    let checks: Vec<_> = report
        .results
        .iter()
        .map(|r| {
            let (status, detail) = match &r.outcome {
                Outcome::Pass(d) => ("pass", d),
                Outcome::Fail(d) => ("fail", d),
                Outcome::Skip(d) => ("skip", d),
            };
            json!({
                "name": r.name,
                "status": status,
                "durationMs": r.duration.as_millis() as u64,
                "detail": detail,
            })
        })
        .collect();
    let doc = json!({
        "url": report.url,
        "host": report.host,
        "passed": report.passed(),
        "failed": report.failed(),
        "skipped": report.skipped(),
        "durationMs": report.duration.as_millis() as u64,
        "checks": checks,
    });
    serde_json::to_string_pretty(&doc).expect("a JSON value always serializes")
}

fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 has no way to write most control characters; a body could hold them.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

pub fn junit(report: &Report) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuite name=\"imagebuild smoke {}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
        xml_escape(&report.url),
        report.results.len(),
        report.failed(),
        report.skipped(),
        report.duration.as_secs_f64()
    );
    for r in &report.results {
        let _ = write!(
            xml,
            "  <testcase classname=\"smoke.{}\" name=\"{}\" time=\"{:.3}\"",
            xml_escape(&report.host),
            r.name,
            r.duration.as_secs_f64()
        );
        match &r.outcome {
            Outcome::Pass(_) => xml.push_str("/>\n"),
            Outcome::Fail(message) => {
                let _ = writeln!(
                    xml,
                    ">\n    <failure message=\"{}\"/>\n  </testcase>",
                    xml_escape(message)
                );
            }
            Outcome::Skip(reason) => {
                let _ = writeln!(
                    xml,
                    ">\n    <skipped message=\"{}\"/>\n  </testcase>",
                    xml_escape(reason)
                );
            }
        }
    }
    xml.push_str("</testsuite>\n");
    xml
}
