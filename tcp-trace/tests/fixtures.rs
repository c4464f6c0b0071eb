//! The fixtures of the owner tests, checked against the real system without
//! the agent: nginx as Debian ships it, ab, cgroups shaped like real hosts',
//! and a runc container. Each test asserts what a later owner test will
//! take for granted.

mod common;

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    process::Command,
    time::Duration,
};

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

/// A `sleep` spawned into `cgroup` is there from its start, as /proc says.
fn check_spawn(cgroup: &TestCgroup) {
    let mut child = cgroup.spawn(Command::new("sleep").arg("30"));
    let pid = child.id();
    assert_eq!(
        cgroup_of(pid).as_deref(),
        Some(cgroup.path()),
        "cgroup of {pid}"
    );
    assert_eq!(cgroup.procs(), vec![pid]);
    assert_eq!(cgroup.id(), fs::metadata(cgroup.dir()).unwrap().ino());
    child.kill().unwrap();
    child.wait().unwrap();
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[test]
fn processes_spawned_into_each_real_world_cgroup_shape_are_there() {
    let service = TestCgroup::service("nginx");
    let docker = TestCgroup::docker();
    let pod = TestCgroup::kubepods_burstable();

    let unit = service.path().strip_prefix("/system.slice/nginx-");
    assert!(
        unit.is_some_and(|u| u.ends_with(".service") && !u.contains('/')),
        "{}",
        service.path()
    );
    let scope = docker.path().strip_prefix("/system.slice/docker-");
    assert!(
        scope
            .and_then(|s| s.strip_suffix(".scope"))
            .is_some_and(|h| is_hex(h, 64)),
        "{}",
        docker.path()
    );
    assert_eq!(docker.container_id(), scope.map(|s| &s[..64]));
    let parts: Vec<&str> = pod.path().split('/').collect();
    let uid = parts[3]
        .strip_prefix("kubepods-burstable-pod")
        .and_then(|p| p.strip_suffix(".slice"))
        .unwrap_or_default();
    let container = parts[4]
        .strip_prefix("cri-containerd-")
        .and_then(|p| p.strip_suffix(".scope"))
        .unwrap_or_default();
    assert!(
        parts[..3] == ["", "kubepods.slice", "kubepods-burstable.slice"]
            && parts.len() == 5
            && uid.split('_').map(str::len).eq([8, 4, 4, 4, 12])
            && is_hex(&uid.replace('_', ""), 32)
            && is_hex(container, 64),
        "{}",
        pod.path()
    );

    for cgroup in [&service, &docker, &pod] {
        assert!(cgroup.dir().starts_with(cgroup2_root()));
        check_spawn(cgroup);
    }
    assert_ne!(service.id(), docker.id());
}

#[test]
fn add_moves_a_running_process_and_drop_removes_what_it_made() {
    let top = unique("tcp-trace-fixture");
    let cgroup = TestCgroup::create(&format!("{top}/app.slice/worker.scope"));
    assert_eq!(cgroup.path(), format!("/{top}/app.slice/worker.scope"));
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let before = cgroup_of(child.id()).unwrap();
    assert_ne!(before, cgroup.path());
    cgroup.add(child.id());
    assert_eq!(cgroup_of(child.id()).as_deref(), Some(cgroup.path()));
    drop(cgroup);
    // The drop killed what was left inside, and removed the three levels.
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(!cgroup2_root().join(&top).exists(), "{top} is left");
}

/// The `net:[INODE]` of a namespace file such as /var/run/netns/NAME.
fn ns_link_of(path: &std::path::Path) -> String {
    format!("net:[{}]", fs::metadata(path).unwrap().ino())
}

#[test]
fn container_runs_in_its_own_netns_and_reaches_a_host_listener() {
    let netns = NetNs::new();
    let port = free_port();
    let listener = TcpListener::bind((netns.host_addr(), port)).unwrap();
    let url = format!("http://{}:{port}/", netns.host_addr());
    let ns_path = netns.path();
    let (host, addr) = (netns.host_addr(), netns.addr());
    let container = Container::options("wget")
        .netns(netns)
        .run(&["wget", "-q", "-O", "-", &url]);
    let pid = container.pid();

    // The container's wget waits for the answer while the test looks at it.
    let (mut stream, peer) = accept_within(&listener, Duration::from_secs(10));
    assert_eq!(
        peer.ip(),
        addr,
        "the connection comes from the container's eth0"
    );
    assert_eq!(stream.local_addr().unwrap().ip(), host);
    let ours = proc_link(std::process::id(), "ns/net");
    let theirs = proc_link(pid, "ns/net");
    assert_ne!(theirs, ours, "container init {pid} shares the test's netns");
    assert_eq!(
        theirs,
        ns_link_of(&ns_path),
        "container init {pid} is not in {}",
        ns_path.display()
    );
    assert_eq!(
        cgroup_of(pid).as_deref(),
        Some(container.cgroup_path()),
        "cgroup v2 path of container init {pid}"
    );
    assert!(
        fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .starts_with("wget\0"),
        "container init {pid} runs the command itself"
    );

    let mut request = [0u8; 1024];
    let n = stream.read(&mut request).unwrap();
    assert!(
        request[..n].starts_with(b"GET / HTTP/1.1\r\n"),
        "{:?}",
        String::from_utf8_lossy(&request[..n])
    );
    stream
        .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nfrom host\n")
        .unwrap();
    drop(stream);
    let out = container.wait();
    assert_eq!(out.stdout, "from host\n");
}

/// Accepts one connection, failing after `limit`.
fn accept_within(listener: &TcpListener, limit: Duration) -> (TcpStream, std::net::SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let accepted = poll(limit, "a connection from the container", || {
        listener.accept().ok()
    });
    accepted.0.set_nonblocking(false).unwrap();
    accepted
}

#[test]
fn container_with_a_docker_cgroupfs_path_is_removed_by_drop() {
    let id = unique_hex64();
    let path = format!("/docker/{id}");
    let container = Container::options("sleep")
        .cgroups_path(&path)
        .run(&["sleep", "30"]);
    let pid = container.pid();
    assert_eq!(cgroup_of(pid).as_deref(), Some(path.as_str()));
    // On a hybrid host runc puts it in every v1 hierarchy too, at the same path.
    let lines = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    eprintln!("/proc/{pid}/cgroup of the container:\n{lines}");
    let (netns, bundle) = (
        container.netns().name().to_string(),
        container.bundle().to_path_buf(),
    );
    let dir = cgroup2_root().join(path.trim_start_matches('/'));
    assert!(dir.is_dir());
    drop(container);
    assert!(!alive(pid), "container init {pid} outlived the drop");
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        !std::path::Path::new("/var/run/netns").join(&netns).exists(),
        "netns {netns} is left"
    );
    assert!(!bundle.exists(), "bundle {} is left", bundle.display());
}
