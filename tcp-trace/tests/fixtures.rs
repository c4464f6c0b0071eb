//! The fixtures of the owner tests, checked against the real system without
//! the agent: nginx as Debian ships it, and ab. Each test asserts what a
//! later owner test will take for granted.

mod common;

use std::{fs, net::TcpListener};

use common::*;

/// The inode of the socket listening on 127.0.0.1:`port`, from /proc/net/tcp.
fn listener_inode(port: u16) -> u64 {
    let want = format!("0100007F:{port:04X}");
    fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f[1] == want && f[3] == "0A").then(|| f[9].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("nothing listens on 127.0.0.1:{port}"))
}

/// Every process with a descriptor for socket `inode`, in pid order.
fn holders(inode: u64) -> Vec<u32> {
    let link = format!("socket:[{inode}]");
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(Result::ok)
                    .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.to_str() == Some(&link)))
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn daemon_nginx_listener_lives_on_in_master_and_workers_only() {
    let port = free_port();
    let nginx = Nginx::start(port, true);
    let (launcher, master, workers) = (nginx.launcher(), nginx.master(), nginx.workers());
    assert_ne!(launcher, master, "with daemon on the master is a fork");
    assert!(
        !alive(launcher),
        "the process that opened the listener ({launcher}) is still there"
    );
    assert_eq!(
        workers.len(),
        NGINX_WORKERS,
        "workers of {master}: {workers:?}"
    );
    for &worker in &workers {
        assert_eq!(
            proc_stat(worker).unwrap().1,
            master,
            "parent of worker {worker}"
        );
    }
    assert_eq!(
        holders(listener_inode(port)),
        nginx.pids(),
        "the listener on {port} is held by the master and its workers, nothing else"
    );
    nginx.wait_serving();
    nginx.stop();
    assert!(!listening(port), "port {port} still listens after stop");
    for pid in [master].iter().chain(&workers) {
        assert!(!alive(*pid), "nginx process {pid} outlived stop");
    }
}

#[test]
fn ab_completes_every_request_and_nginx_logs_each() {
    let port = free_port();
    let nginx = Nginx::start(port, false);
    assert_eq!(
        nginx.master(),
        nginx.launcher(),
        "with daemon off the master is our child"
    );
    let output = ab(port, 200, 8);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("Complete requests:      200"), "{said}");
    let logged = nginx.access_log().lines().count();
    assert_eq!(logged, 200, "access log of nginx on {port}");
}

#[test]
fn dropping_nginx_stops_it_even_when_the_test_fails() {
    let port = free_port();
    let mut pids = Vec::new();
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let nginx = Nginx::start(port, true);
        pids = nginx.pids();
        panic!("a failing test");
    }));
    assert!(failed.is_err());
    assert_eq!(pids.len(), 1 + NGINX_WORKERS);
    assert!(!listening(port), "port {port} still listens after the drop");
    for pid in pids {
        assert!(!alive(pid), "nginx process {pid} outlived the drop");
    }
}

#[test]
fn nginx_that_cannot_listen_fails_with_its_error_log() {
    let port = free_port();
    let _taken = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let failed = std::panic::catch_unwind(|| Nginx::start(port, true)).err();
    let message = failed
        .as_deref()
        .and_then(|p| p.downcast_ref::<String>())
        .expect("nginx started on a taken port");
    assert!(
        message.contains("exited with") && message.contains("Address already in use"),
        "{message}"
    );
}
