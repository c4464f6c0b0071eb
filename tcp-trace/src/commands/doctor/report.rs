//! The doctor's findings as text or as one JSON object.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::{
    evidence::Thresholds,
    rules::{Finding, Rule},
};
use crate::{
    output::{
        add_owner_origin, owner_json,
        text::{container_cell, human_duration, owner_cells},
    },
    system::netstat::CONTEXT,
};

/// What the run itself was.
pub struct Run {
    pub watched_ns: u64,
    pub received: u64,
    pub dropped: u64,
    /// Growth of the kernel's context counters over the run, when read.
    pub counters: Option<Vec<(&'static str, i64)>>,
}

pub fn json(findings: &[Finding], run: &Run, th: &Thresholds) -> Value {
    let findings: Vec<Value> = findings
        .iter()
        .map(|f| {
            let (pid, comm) = owner_json(f.owner.as_ref());
            let evidence: Map<String, Value> = f
                .evidence
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            let mut v = json!({
                "rule": f.rule.name(),
                "severity": f.severity.name(),
                "pid": pid,
                "comm": comm,
                "remote": f.remote,
                "evidence": evidence,
                "why": f.why,
                "fix": f.fix,
            });
            add_owner_origin(&mut v, f.owner.as_ref());
            v
        })
        .collect();
    let checked: Vec<Value> = Rule::ALL
        .iter()
        .map(|r| json!({"rule": r.name(), "checks": r.checks(th)}))
        .collect();
    json!({
        "type": "doctor",
        "watched_ns": run.watched_ns,
        "events_received": run.received,
        "events_dropped": run.dropped,
        "findings": findings,
        "checked": checked,
        "kernel_counters_growth": run.counters.as_ref().map(|c| {
            c.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<String, Value>>()
        }),
    })
}

/// A JSON value as a text cell: strings bare, lists joined.
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}: {}", cell(v)))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

pub fn text(findings: &[Finding], run: &Run, th: &Thresholds) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tcp-trace doctor: watched {} ({} transitions, {} dropped): {}",
        human_duration(run.watched_ns),
        run.received,
        run.dropped,
        match findings.len() {
            0 => "nothing found".to_string(),
            1 => "1 finding".to_string(),
            n => format!("{n} findings"),
        }
    );
    if run.dropped > 0 {
        let _ = writeln!(
            out,
            "  ({} transitions were lost: counts below may be short by as many)",
            run.dropped
        );
    }
    for f in findings {
        let (pid, comm) = owner_cells(f.owner.as_ref());
        let container = match container_cell(f.owner.as_ref()).as_str() {
            "-" => String::new(),
            id => format!(" in container {id}"),
        };
        let remote = f
            .remote
            .as_ref()
            .map_or(String::new(), |r| format!(" toward {r}"));
        let _ = writeln!(
            out,
            "\n[{}] {}: pid {pid} ({comm}){container}{remote}",
            f.severity.name(),
            f.rule.name()
        );
        let evidence: Vec<String> = f
            .evidence
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect();
        let _ = writeln!(out, "  evidence: {}", evidence.join("; "));
        let _ = writeln!(out, "  why: {}", f.why);
        let _ = writeln!(out, "  fix: {}", f.fix);
    }
    if findings.is_empty() {
        let _ = writeln!(out, "\nChecked, and found healthy:");
        for rule in Rule::ALL {
            let _ = writeln!(out, "  {}: {}", rule.name(), rule.checks(th));
        }
    }
    if let Some(counters) = &run.counters {
        let _ = writeln!(
            out,
            "\nKernel counters during the run (this network namespace, all sockets):"
        );
        for (name, growth) in counters {
            let meaning = CONTEXT.iter().find(|c| c.0 == *name).map_or("", |c| c.1);
            let _ = writeln!(out, "  {name:<28} {growth:>+8}  {meaning}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        commands::doctor::rules::Severity,
        model::{Owner, OwnerSource},
    };

    fn th() -> Thresholds {
        Thresholds {
            close_wait_sockets: 5,
            close_wait_age_ns: 60_000_000_000,
            timewait_share: 0.1,
            connect_failures: 3,
            retransmitted_handshakes: 1,
            resets: 5,
            short_connections: 100,
            short_lifetime_ns: 100_000_000,
            short_bytes: 16384,
            half_closed_age_ns: 10_000_000_000,
            keepalive_timeouts: 1,
        }
    }

    fn run() -> Run {
        Run {
            watched_ns: 2_000_000_000,
            received: 10,
            dropped: 0,
            counters: None,
        }
    }

    #[test]
    fn a_healthy_report_says_what_it_checked() {
        let text = text(&[], &run(), &th());
        assert!(text.contains("nothing found"), "{text}");
        for rule in Rule::ALL {
            assert!(text.contains(rule.name()), "{text}");
        }
        let v = json(&[], &run(), &th());
        assert_eq!(v["findings"], json!([]));
        assert_eq!(v["checked"].as_array().unwrap().len(), Rule::ALL.len());
    }

    #[test]
    fn a_finding_names_owner_remote_and_evidence() {
        let f = Finding {
            rule: Rule::Resets,
            severity: Severity::Warning,
            owner: Some(Owner::process(7, b"app", OwnerSource::Task)),
            remote: Some("10.0.0.1:80".into()),
            evidence: vec![("resets", json!(9)), ("peers", json!(["a (1)", "b (2)"]))],
            why: "because",
            fix: "change",
        };
        let text = text(std::slice::from_ref(&f), &run(), &th());
        assert!(
            text.contains("[warning] resets: pid 7 (app) toward 10.0.0.1:80"),
            "{text}"
        );
        assert!(
            text.contains("evidence: resets=9; peers=a (1), b (2)"),
            "{text}"
        );
        let v = json(&[f], &run(), &th());
        assert_eq!(v["findings"][0]["pid"], 7);
        assert_eq!(v["findings"][0]["evidence"]["resets"], 9);
        assert_eq!(v["findings"][0]["remote"], "10.0.0.1:80");
    }
}
