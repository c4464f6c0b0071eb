//! Debian's nginx, run with a config of the test's own, and `ab` to load it.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use super::{
    agent::wait_timeout,
    scratch::{alive, children_of, listening, poll, TempDir},
};

/// The binary of Debian's `nginx` package (pulled in by `nginx-light`).
const NGINX: &str = "/usr/sbin/nginx";

/// What the index file holds: `ab` checks every response has its length.
pub const NGINX_INDEX: &str = "tcp-trace\n";

/// How many workers the master forks.
pub const NGINX_WORKERS: usize = 2;

/// An nginx master with two workers on 127.0.0.1:PORT, its config, pid file,
/// logs and index file in a temp dir of its own. Dropping it stops nginx and
/// waits until nothing listens on the port, also when the test failed.
pub struct Nginx {
    port: u16,
    master: u32,
    /// The process the test started: the master itself with `daemon off`;
    /// with `daemon on` the one that opened the listener, forked the master
    /// and exited (already reaped by `start`).
    launcher: Option<Child>,
    launcher_pid: u32,
    stopped: bool,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx on 127.0.0.1:`port` and waits until the master has
    /// written its pid file, forked both workers and the port listens. It
    /// opens no connection to find that out (a probe would be one more
    /// socket for an owner test to explain): `wait_serving` does.
    ///
    /// With `daemon` the process started here opens the listening socket,
    /// forks the master and exits: the listener lives on in a process that
    /// never called listen().
    pub fn start(port: u16, daemon: bool) -> Nginx {
        let dir = TempDir::new("nginx");
        let www = dir.join("www");
        fs::create_dir(&www).unwrap();
        fs::write(www.join("index.html"), NGINX_INDEX).unwrap();
        let d = dir.path().display();
        let on_off = if daemon { "on" } else { "off" };
        // `user root`: the workers keep root, so they can read the temp dir
        // wherever TMPDIR points. The *_temp_path lines keep nginx out of
        // /var/lib/nginx, the system nginx's.
        let config = format!(
            "user root;
worker_processes {NGINX_WORKERS};
master_process on;
daemon {on_off};
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
    }}
}}
"
        );
        let conf = dir.join("nginx.conf");
        fs::write(&conf, config).unwrap();
        let mut launcher = Command::new(NGINX)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            // Before the config is read nginx logs to the built-in path
            // (stderr in Debian's build): the temp dir's log from the start.
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("running {NGINX}: {e} (Debian package nginx-light; cargo xtask setup installs it)")
            });
        let launcher_pid = launcher.id();
        let mut nginx = Nginx {
            port,
            master: 0,
            launcher: None,
            launcher_pid,
            stopped: false,
            dir,
        };
        if daemon {
            // The daemon's parent exits once the master is forked.
            let status = wait_timeout(&mut launcher, Duration::from_secs(10));
            assert!(
                status.success(),
                "nginx on port {port} exited with {status} at start:\n{}",
                nginx.error_log()
            );
        } else {
            nginx.launcher = Some(launcher);
        }
        let pid_file = nginx.dir.join("nginx.pid");
        nginx.master = poll(
            Duration::from_secs(10),
            "nginx writing its pid file",
            || {
                if let Some(child) = nginx.launcher.as_mut() {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!(
                            "nginx on port {port} exited with {status} at start:\n{}",
                            fs::read_to_string(pid_file.with_file_name("error.log"))
                                .unwrap_or_default()
                        );
                    }
                }
                fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
            },
        );
        if !daemon {
            assert_eq!(
                nginx.master, launcher_pid,
                "with daemon off the master is the child"
            );
        }
        poll(
            Duration::from_secs(10),
            &format!("nginx on port {port}: {NGINX_WORKERS} workers and a listener"),
            || (nginx.workers().len() == NGINX_WORKERS && listening(port)).then_some(()),
        );
        nginx
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The master's pid, from the pid file.
    pub fn master(&self) -> u32 {
        self.master
    }

    /// The pid of the process the test started: with `daemon on` the one
    /// that called listen() and exited; with `daemon off` the master.
    pub fn launcher(&self) -> u32 {
        self.launcher_pid
    }

    /// The live children of the master: the workers.
    pub fn workers(&self) -> Vec<u32> {
        children_of(self.master)
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.master];
        pids.extend(self.workers());
        pids
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Waits until a GET of / answers 200 with the index file: one
    /// connection from the test process, closed by it.
    pub fn wait_serving(&self) {
        let port = self.port;
        let response = poll(
            Duration::from_secs(10),
            &format!("nginx serving on {port}"),
            || {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
                stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                stream
                    .write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    .ok()?;
                let mut response = String::new();
                stream.read_to_string(&mut response).ok()?;
                Some(response)
            },
        );
        assert!(
            response.starts_with("HTTP/1.1 200") && response.ends_with(NGINX_INDEX),
            "nginx on port {port} answered:\n{response}"
        );
    }

    /// Stops nginx (SIGTERM to the master: the fast shutdown) and waits until
    /// master and workers are gone and nothing listens on the port; SIGKILLs
    /// whatever is left after 10 s. Returns what went wrong, if anything.
    fn shut_down(&mut self) -> Result<(), String> {
        self.stopped = true;
        if self.master == 0 {
            // Start failed before the pid file was read: it may be there now.
            self.master = fs::read_to_string(self.dir.join("nginx.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
        }
        let mut pids = if self.master == 0 {
            Vec::new()
        } else {
            self.pids()
        };
        if let Some(child) = self.launcher.as_ref() {
            pids.push(child.id());
        }
        pids.sort_unstable();
        pids.dedup();
        for &p in &pids {
            // SIGTERM to the master stops its workers too; SIGTERM to a
            // worker alone would only make the master fork another.
            if p == self.master || self.master == 0 {
                // SAFETY: signalling a process we started or read from
                // nginx's own pid file.
                unsafe { libc::kill(p as i32, libc::SIGTERM) };
            }
        }
        // Without a master nginx never listened: the port may be someone
        // else's (the reason nginx failed).
        let listened = self.master != 0;
        let stopped = |pids: &[u32]| {
            // The master reaps its workers; the daemonized master is PID 1's
            // to reap, so a zombie counts as gone.
            pids.iter().all(|&p| !alive(p)) && !(listened && listening(self.port))
        };
        let mut result = Ok(());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !stopped(&pids) {
            if std::time::Instant::now() > deadline {
                for &p in &pids {
                    // SAFETY: signalling the nginx processes we started.
                    unsafe { libc::kill(p as i32, libc::SIGKILL) };
                }
                result = Err(format!(
                    "nginx on port {} (pids {pids:?}) did not stop within 10 s of SIGTERM; killed",
                    self.port
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(mut child) = self.launcher.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        result
    }

    /// Stops nginx and fails if it did not stop by itself.
    pub fn stop(mut self) {
        if let Err(e) = self.shut_down() {
            panic!("{e}");
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if let Err(e) = self.shut_down() {
            eprintln!("{e}");
        }
    }
}

/// `ab -n requests -c concurrency http://127.0.0.1:PORT/`: one new
/// connection per request. Fails unless every request completed with the
/// index file's length.
pub fn ab(port: u16, requests: usize, concurrency: usize) -> Output {
    let output = Command::new("ab")
        .args(["-q", "-s", "10", "-n"])
        .arg(requests.to_string())
        .arg("-c")
        .arg(concurrency.to_string())
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .output()
        .expect("running ab (Debian package apache2-utils; cargo xtask setup installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let said = || format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "ab -n {requests} -c {concurrency} on port {port} exited with {}:\n{}",
        output.status,
        said()
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("ab printed no {name:?}:\n{}", said()))
            .to_string()
    };
    assert_eq!(
        field("Complete requests:"),
        requests.to_string(),
        "ab on port {port}:\n{}",
        said()
    );
    assert_eq!(
        field("Failed requests:"),
        "0",
        "ab on port {port}:\n{}",
        said()
    );
    assert_eq!(
        field("Document Length:"),
        format!("{} bytes", NGINX_INDEX.len()),
        "ab on port {port}:\n{}",
        said()
    );
    output
}
