//! A real container: Debian's runc, a rootfs of nothing but a static
//! busybox, its own network namespace joined to the host by a veth pair, its
//! own cgroup. No image, no registry.

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::{
    agent::wait_timeout,
    cgroup::SharedDirs,
    net::NetNs,
    scratch::{unique, TempDir},
};

const RUNC: &str = "/usr/sbin/runc";

/// Debian's busybox-static, the container's only binary.
const BUSYBOX: &str = "/bin/busybox";

/// runc's state directory for the tests' containers, apart from the host's
/// (`runc --root /run/tcp-trace-runc list` shows what a killed test left).
const RUNC_ROOT: &str = "/run/tcp-trace-runc";

/// A container run by `runc run`, in the foreground of a runc process of the
/// test's: runc stays its parent, and its exit status is the container's.
/// Dropping it kills and deletes the container, its namespace and bundle.
pub struct Container {
    id: String,
    cgroups_path: String,
    runc: Option<Child>,
    pid: u32,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    /// The ancestors of the cgroup in each hierarchy, deepest first: runc
    /// makes them and leaves them behind.
    ancestors: Vec<Vec<PathBuf>>,
    // Dropped after the container is deleted (fields drop in order).
    netns: NetNs,
    bundle: TempDir,
}

/// What a container printed, and how it ended.
pub struct ContainerOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Options for `Container::start`.
pub struct ContainerOptions {
    name: String,
    netns: Option<NetNs>,
    cgroups_path: Option<String>,
}

impl ContainerOptions {
    /// Runs the container in `netns` (made beforehand so the test knows its
    /// addresses, for example to bind a listener to `host_addr()`) instead
    /// of a new one.
    pub fn netns(mut self, netns: NetNs) -> Self {
        self.netns = Some(netns);
        self
    }

    /// The OCI `cgroupsPath`, absolute (for example `/docker/<64 hex>`, the
    /// shape of docker's cgroupfs driver); default `/tcp-trace-test/<id>`.
    /// It must be unique to the test.
    pub fn cgroups_path(mut self, path: &str) -> Self {
        assert!(
            path.starts_with('/'),
            "cgroupsPath {path:?} is not absolute"
        );
        self.cgroups_path = Some(path.to_string());
        self
    }

    /// Starts `command` (found on the container's PATH: /bin holds every
    /// busybox applet) as the container's init.
    pub fn run(self, command: &[&str]) -> Container {
        Container::start(self, command)
    }
}

impl Container {
    /// Options for a container whose id is `tt-NAME-<pid>-<n>`.
    pub fn options(name: &str) -> ContainerOptions {
        ContainerOptions {
            name: name.to_string(),
            netns: None,
            cgroups_path: None,
        }
    }

    /// Runs `command` in a new container with a network namespace of its own.
    pub fn run(name: &str, command: &[&str]) -> Container {
        Self::options(name).run(command)
    }

    fn start(options: ContainerOptions, command: &[&str]) -> Container {
        assert!(!command.is_empty(), "a container needs a command");
        let id = unique(&format!("tt-{}", options.name));
        let cgroups_path = options
            .cgroups_path
            .unwrap_or_else(|| format!("/tcp-trace-test/{id}"));
        let netns = options.netns.unwrap_or_else(NetNs::new);
        let bundle = TempDir::new("bundle");
        build_rootfs(&bundle.join("rootfs"));
        write_config(&bundle, &id, &cgroups_path, &netns.path(), command);

        // Held until runc has made the cgroup, so no test removes an
        // ancestor runc is about to create it in.
        let mut shared = SharedDirs::lock();
        let ancestors = ancestors(&cgroups_path);
        for dir in ancestors.iter().flatten() {
            if !dir.exists() {
                shared.add(dir.clone());
            }
        }
        // A leftover of a dead run with our pid.
        let _ = runc_cli(&["delete", "--force", &id]);
        let mut runc = Command::new(RUNC)
            .args(["--root", RUNC_ROOT, "run", "--bundle"])
            .arg(bundle.path())
            .arg(&id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("running {RUNC}: {e} (Debian package runc; cargo xtask setup installs it)")
            });
        let stdin = runc.stdin.take().unwrap();
        let stdout = Some(read_all(runc.stdout.take().unwrap()));
        let stderr = Some(read_all(runc.stderr.take().unwrap()));
        let mut container = Container {
            id,
            cgroups_path,
            runc: Some(runc),
            pid: 0,
            stdout,
            stderr,
            ancestors,
            netns,
            bundle,
        };
        // No panic while the lock is held: the container's drop takes it.
        let running = container.wait_running(Duration::from_secs(20));
        drop(shared);
        container.pid = running.unwrap_or_else(|e| panic!("{e}"));
        go(stdin);
        container
    }

    /// The init's pid once runc says the container runs (its shell waiting
    /// for `go`), or why it never will.
    fn wait_running(&mut self, limit: Duration) -> Result<u32, String> {
        let deadline = Instant::now() + limit;
        loop {
            let runc = self.runc.as_mut().unwrap();
            if let Ok(Some(status)) = runc.try_wait() {
                let stderr = self.stderr.take().unwrap().join().unwrap_or_default();
                return Err(format!(
                    "runc run {} exited with {status} before the container ran:\n{stderr}",
                    self.id
                ));
            }
            let state = runc_cli(&["state", &self.id]).unwrap_or_default();
            let state: serde_json::Value = serde_json::from_str(&state).unwrap_or_default();
            if state["status"] == "running" {
                if let Some(pid) = state["pid"].as_u64() {
                    return Ok(pid as u32);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "container {} not running within {limit:?}: {state}",
                    self.id
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's init: the process that runs `command` (the
    /// container's shell waited for the test, then exec'd it: same pid).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The OCI cgroupsPath; on a host whose runc uses the cgroupfs driver it
    /// is also the path in every hierarchy, v2's `0::` line included.
    pub fn cgroup_path(&self) -> &str {
        &self.cgroups_path
    }

    /// The container's network namespace, its addresses and the host's.
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    pub fn bundle(&self) -> &Path {
        self.bundle.path()
    }

    /// Waits (up to 30 s) for the container to exit, which it must do
    /// successfully; returns its status and what it printed.
    pub fn wait(mut self) -> ContainerOutput {
        let status = wait_timeout(self.runc.as_mut().unwrap(), Duration::from_secs(30));
        self.runc = None;
        let out = ContainerOutput {
            status,
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        };
        assert!(
            out.status.success(),
            "container exited with {}: {}",
            out.status,
            out.stderr
        );
        out
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut runc) = self.runc.take() {
            let _ = runc_cli(&["kill", &self.id, "KILL"]);
            // The foreground runc exits once its init is gone, and deletes
            // the container (its cgroups too).
            let deadline = Instant::now() + Duration::from_secs(10);
            while runc.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = runc.kill();
                    let _ = runc.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = runc_cli(&["delete", "--force", &self.id]);
        if let Ok(mut shared) = SharedDirs::open() {
            for hierarchy in &self.ancestors {
                shared.remove_unused(hierarchy);
            }
        }
    }
}

/// `runc --root RUNC_ROOT ARGS`: its stdout, or what it said on failure.
fn runc_cli(args: &[&str]) -> Result<String, String> {
    let out = Command::new(RUNC)
        .arg("--root")
        .arg(RUNC_ROOT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {RUNC}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Tells the container's shell to exec the command, and closes its stdin.
fn go(mut stdin: ChildStdin) {
    stdin
        .write_all(b"go\n")
        .expect("telling the container to go");
}

fn read_all(mut from: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// rootfs/bin/busybox and a link to it for each applet; the directories
/// runc mounts over.
fn build_rootfs(rootfs: &Path) {
    assert!(
        is_static(Path::new(BUSYBOX)),
        "{BUSYBOX} is not statically linked: the container has no libc \
         (install Debian's busybox-static; cargo xtask setup does)"
    );
    let bin = rootfs.join("bin");
    for dir in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    fs::copy(BUSYBOX, bin.join("busybox")).expect("copying busybox into the rootfs");
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            symlink("busybox", bin.join(applet)).unwrap();
        }
    }
}

/// Whether the ELF file at `path` has no program interpreter.
fn is_static(path: &Path) -> bool {
    let Ok(elf) = fs::read(path) else {
        return false;
    };
    // 64-bit little-endian ELF: e_phoff at 0x20, e_phentsize 0x36, e_phnum 0x38.
    if elf.len() < 0x40 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).all(|i| {
        let at = phoff + i * size;
        // PT_INTERP = 3: a dynamic loader is named.
        elf.get(at..at + 4) != Some(&3u32.to_le_bytes()[..])
    })
}

/// config.json from `runc spec`, changed: no terminal, the command behind a
/// shell that waits for the test's `go`, the test's network namespace, the
/// cgroup path.
fn write_config(bundle: &TempDir, id: &str, cgroups_path: &str, netns: &Path, command: &[&str]) {
    let spec = Command::new(RUNC)
        .args(["spec", "--bundle"])
        .arg(bundle.path())
        .output()
        .expect("runc spec");
    assert!(
        spec.status.success(),
        "runc spec: {}",
        String::from_utf8_lossy(&spec.stderr)
    );
    let file = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
    config["hostname"] = id.into();
    let process = &mut config["process"];
    process["terminal"] = false.into();
    // `read` returns once the test says go (the container's pid is known by
    // then); exec keeps that pid for the command.
    let mut args = vec!["/bin/sh", "-c", "read -r go && exec \"$@\"", "sh"];
    args.extend_from_slice(command);
    process["args"] = args.into();
    let linux = &mut config["linux"];
    linux["cgroupsPath"] = cgroups_path.into();
    let namespaces = linux["namespaces"].as_array_mut().unwrap();
    let network = namespaces
        .iter_mut()
        .find(|n| n["type"] == "network")
        .expect("runc spec's config has a network namespace");
    network["path"] = netns.to_str().unwrap().into();
    fs::write(&file, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// The directories of `cgroups_path`'s ancestors in each cgroup hierarchy
/// mounted (v1 and v2), deepest first.
fn ancestors(cgroups_path: &str) -> Vec<Vec<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts = mountinfo.lines().filter_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fstype = fs.split_whitespace().next()?;
        (fstype == "cgroup" || fstype == "cgroup2")
            .then(|| PathBuf::from(mount.split_whitespace().nth(4).unwrap()))
    });
    let components: Vec<&str> = cgroups_path.split('/').filter(|c| !c.is_empty()).collect();
    mounts
        .map(|mount| {
            (1..components.len())
                .rev()
                .map(|depth| {
                    components[..depth]
                        .iter()
                        .fold(mount.clone(), |d, c| d.join(c))
                })
                .collect()
        })
        .collect()
}
