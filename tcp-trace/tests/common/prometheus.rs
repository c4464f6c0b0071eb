//! A real Prometheus (Debian's package, installed by `cargo xtask setup`)
//! scraping the agent, queried through its HTTP API.

use std::{
    fs,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use super::{get, poll, url_encode, TempDir};

/// A Prometheus of the test's own, killed when dropped.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus on `addr`, scraping `target` every second, and waits
    /// until it is ready.
    pub fn scraping(target: SocketAddr, addr: SocketAddr) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: tcp-trace\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "running prometheus (Debian package prometheus; cargo xtask setup installs it)",
            );
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        poll(Duration::from_secs(60), "prometheus ready", || {
            get(addr, "/-/ready", "*/*").filter(|p| p.status == 200)
        });
        prometheus
    }

    /// The value of an instant query that returns one series, `None` while
    /// it returns none.
    pub fn value(&self, query: &str) -> Option<f64> {
        let page = get(
            self.addr,
            &format!("/api/v1/query?query={}", url_encode(query)),
            "application/json",
        )?;
        let v: Value = serde_json::from_str(&page.body).ok()?;
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{query}: more than one series: {v}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `query` has the value `done` wants, for up to `limit`;
    /// returns the last value seen.
    pub fn wait_for(&self, query: &str, limit: Duration, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = std::time::Instant::now() + limit;
        let mut last = None;
        while std::time::Instant::now() < deadline {
            last = self.value(query);
            if last.is_some_and(&done) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        last.unwrap_or_else(|| panic!("prometheus has no series for {query}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
