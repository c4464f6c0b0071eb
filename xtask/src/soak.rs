//! `cargo xtask soak`: continuous connection churn under the streaming
//! agents for a long while, to show their memory stays flat.

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{agent::Agent, bench::date};

/// Connections per second: steady, well below what the machine sustains.
const RATE: u64 = 2_000;
/// How much an agent's resident memory may grow after its first sample.
const RSS_SLACK: f64 = 1.10;

/// Distinct process names the churn cycles through, for `serve`'s groups.
const NAMES: u32 = 10_000;

/// An agent's resident memory between its once-a-second timewait readings
/// (whose transient tables live a few hundred milliseconds): the least of
/// five reads over a second.
fn settled_rss_kib(agent: &Agent) -> u64 {
    (0..5)
        .map(|_| {
            let rss = agent.rss_kib();
            thread::sleep(Duration::from_millis(200));
            rss
        })
        .min()
        .unwrap_or(0)
}

/// Runs `minutes` of churn with `watch`, `life` and `serve` attached, samples
/// their resident memory and map memory every minute, writes docs/SOAK.md,
/// and fails when any grew.
pub fn soak(minutes: u64, root: &Path, tracer: &Path, churn_bin: &Path) -> Result<()> {
    let configs: [&[&str]; 3] = [
        &["watch", "--json"],
        &["life", "--json"],
        // Groups idle for a minute are dropped, so the names come and go.
        &["serve", "--listen", "127.0.0.1:0", "--group-ttl", "60"],
    ];
    let agents: Vec<Agent> = configs
        .iter()
        .map(|args| Agent::start(tracer, args))
        .collect::<Result<_>>()?;
    let seconds = minutes * 60;
    let churn = Command::new(churn_bin)
        .args([seconds.to_string(), RATE.to_string()])
        .env("CHURN_NAMES", NAMES.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting churn")?;
    let started = Instant::now();
    // Per minute: (minute, per agent (RSS KiB, map memlock bytes)).
    let mut samples: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
    for minute in 1..=minutes {
        let due = Duration::from_secs(minute * 60);
        thread::sleep(due.saturating_sub(started.elapsed()));
        let sample = agents
            .iter()
            .map(|a| (settled_rss_kib(a), a.map_memlock()))
            .collect();
        println!("minute {minute}: {sample:?}");
        samples.push((minute, sample));
    }
    let out = churn.wait_with_output().context("waiting for churn")?;
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).context("churn's output")?;
    let mut totals = Vec::new();
    for agent in agents {
        totals.push(agent.stop()?);
    }

    let mut table = String::from("| minute |");
    for args in configs {
        let _ = write!(table, " `{}` RSS MiB | maps MiB |", args.join(" "));
    }
    table.push_str("\n| --- |");
    table.push_str(&" --- | --- |".repeat(configs.len()));
    table.push('\n');
    for (minute, sample) in &samples {
        let _ = write!(table, "| {minute} |");
        for (rss, memlock) in sample {
            let _ = write!(
                table,
                " {:.1} | {:.1} |",
                *rss as f64 / 1024.0,
                *memlock as f64 / 1048576.0
            );
        }
        table.push('\n');
    }
    let mut verdicts = String::new();
    let mut grew = false;
    // Warm-up: the first quarter (at least the first sample), while tables
    // grow to the load's working size; a leak keeps growing after it.
    let warm_up = &samples[..(samples.len() / 4).max(1)];
    for (i, args) in configs.iter().enumerate() {
        let first = samples[0].1[i];
        let warm = warm_up.iter().map(|(_, s)| s[i].0).max().unwrap_or(0);
        let last = samples[samples.len() - 1].1[i];
        let flat = (last.0 as f64) <= warm as f64 * RSS_SLACK + 1024.0 && last.1 == first.1;
        grew |= !flat;
        let (received, dropped) = (totals[i].received, totals[i].dropped);
        let _ = writeln!(
            verdicts,
            "- `tcp-trace {}`: RSS {:.1} -> {:.1} MiB, maps {:.1} -> {:.1} MiB: {}; \
             {received} events received, {dropped} dropped.",
            args.join(" "),
            first.0 as f64 / 1024.0,
            last.0 as f64 / 1024.0,
            first.1 as f64 / 1048576.0,
            last.1 as f64 / 1048576.0,
            if flat { "flat" } else { "GREW" },
        );
    }
    let report = format!(
        "# Soak\n\n\
         Written by `cargo xtask soak` on {date}: {minutes} minutes of `churn` at {RATE} \
         connections per second ({made} connections, {elapsed:.0} s, from client threads \
         cycling through {NAMES} names) with the agents attached, sampled every minute (resident memory: the least of five reads over a second, \
         between `serve`'s timewait readings). Flat means the last sample's resident memory is within \
         {slack:.0} % (+1 MiB) of the highest in the warm-up (the first quarter of the run, \
         while tables grow to the load's working size), and its maps' memory (memlock, from \
         fdinfo) is unchanged.\n\n{table}\n{verdicts}",
        date = date(),
        made = made["connections"].as_u64().unwrap_or(0),
        elapsed = started.elapsed().as_secs_f64(),
        slack = (RSS_SLACK - 1.0) * 100.0,
    );
    let path = root.join("docs/SOAK.md");
    fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    println!("{verdicts}wrote {}", path.display());
    if grew {
        bail!("an agent's memory grew during the soak");
    }
    Ok(())
}
