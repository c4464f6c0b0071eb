//! Teaching the kernel program, on every CPU, what task context looks like.
//!
//! The program tells process context from softirq by the `pt_regs` pointer the
//! kernel passes it (one per context level and CPU). It learns the task-context
//! pointer of a CPU from a `listen()` made there, so we make one on each CPU.

use std::{
    fs,
    net::{Ipv4Addr, TcpListener},
    thread,
};

use anyhow::{Context as _, Result};

/// Makes a CLOSE -> LISTEN transition on each online CPU we may run on.
/// Returns how many CPUs were primed.
pub fn prime_all_cpus() -> Result<usize> {
    let online = fs::read_to_string("/sys/devices/system/cpu/online")
        .context("reading /sys/devices/system/cpu/online")?;
    let cpus = parse_cpu_list(online.trim())
        .with_context(|| format!("parsing the online CPU list `{}`", online.trim()))?;
    let primed = thread::scope(|scope| {
        let handles: Vec<_> = cpus
            .iter()
            .map(|&cpu| scope.spawn(move || listen_on_cpu(cpu)))
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .filter(Result::is_ok)
            .count()
    });
    Ok(primed)
}

fn listen_on_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; the calls only touch this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Binding and listening is all it takes; dropping it closes the socket.
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map(drop)
}

/// Parses the kernel's CPU list format: `0-3,8,10-11`.
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().ok()?..=b.parse().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-1"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0-2,5,7-8"), Some(vec![0, 1, 2, 5, 7, 8]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x"), None);
    }
}
