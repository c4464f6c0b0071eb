//! cgroup v2 directories with the path shapes of real hosts (systemd
//! services, docker scopes, kubernetes pods), and processes placed in them.
//!
//! The cgroup v2 hierarchy is where its `cgroup2` mount is: /sys/fs/cgroup on
//! a pure-v2 host, /sys/fs/cgroup/unified on a hybrid one (v1 controllers
//! beside it). Either way a path here is relative to that mount, as in the
//! `0::` line of /proc/PID/cgroup, and the directory's inode is the id the
//! kernel's bpf_get_current_cgroup_id() returns for a task in it.

use std::{
    ffi::CString,
    fs,
    io::{self, Read as _, Seek as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::OnceLock,
    time::{Duration, Instant},
};

use super::scratch::{unique, unique_hex64, unique_pod_uid};

/// Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo.
pub fn cgroup2_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
        mountinfo
            .lines()
            .find_map(|line| {
                // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
                let (mount, fs) = line.split_once(" - ")?;
                (fs.split_whitespace().next()? == "cgroup2")
                    .then(|| PathBuf::from(mount.split_whitespace().nth(4).unwrap()))
            })
            .unwrap_or_else(|| panic!("no cgroup2 mount in /proc/self/mountinfo:\n{mountinfo}"))
    })
}

/// The cgroup v2 path of `pid` (the `0::` line of /proc/PID/cgroup), such
/// as "/system.slice/nginx.service"; `None` once the process is gone.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The directories (in any cgroup hierarchy) that test fixtures created and
/// that other tests may share, such as `system.slice` on a host that had
/// none: one per line, in a file that is also the lock every fixture holds
/// while it creates or removes cgroup directories, so no test removes an
/// ancestor another test (of this process or another) is creating a cgroup
/// in, and the last one out removes what any of them made.
const SHARED_DIRS: &str = "/run/tcp-trace-test-cgroups";

/// The locked list of shared directories fixtures made; the lock goes with it.
pub(super) struct SharedDirs {
    file: fs::File,
    dirs: Vec<PathBuf>,
}

impl SharedDirs {
    pub(super) fn lock() -> SharedDirs {
        Self::open().unwrap_or_else(|e| panic!("locking {SHARED_DIRS}: {e}"))
    }

    /// `lock` for a drop, which must not panic.
    pub(super) fn open() -> io::Result<SharedDirs> {
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(SHARED_DIRS)?;
        // SAFETY: flock on a descriptor the File owns; released when it closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let dirs = text.lines().map(PathBuf::from).collect();
        Ok(SharedDirs { file, dirs })
    }

    /// Notes that a fixture made `dir` (or is about to have runc make it).
    pub(super) fn add(&mut self, dir: PathBuf) {
        if !self.dirs.contains(&dir) {
            self.dirs.push(dir);
        }
    }

    /// Removes the fixture-made directories among `ancestors` (deepest
    /// first) that nothing is in any more; stops at the first that is busy.
    pub(super) fn remove_unused(&mut self, ancestors: &[PathBuf]) {
        for dir in ancestors {
            if !self.dirs.contains(dir) {
                break;
            }
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Busy: another test's cgroup is inside; the last one out
                // removes it.
                Err(_) => break,
            }
            self.dirs.retain(|d| d != dir);
        }
    }
}

impl Drop for SharedDirs {
    fn drop(&mut self) {
        let mut text = String::new();
        for dir in &self.dirs {
            text.push_str(&format!("{}\n", dir.display()));
        }
        let _ = self.file.set_len(0);
        let _ = self.file.seek(io::SeekFrom::Start(0));
        let _ = self.file.write_all(text.as_bytes());
    }
}

/// A cgroup v2 directory of the test's own, at a path shaped like a real
/// host's. Dropping it kills what is left in it, removes it, then the
/// ancestors that fixtures created and nothing is in any more, deepest first
/// (never one that was there before, such as a real host's `system.slice`).
pub struct TestCgroup {
    /// Relative to the cgroup2 root, starting with "/".
    path: String,
    dir: PathBuf,
    /// Every ancestor of `dir` below the root, deepest first.
    ancestors: Vec<PathBuf>,
}

impl TestCgroup {
    /// Creates `relative_path` (without or with a leading "/") under the
    /// cgroup2 root, with each missing ancestor. Its last component must be
    /// unique to the test (see `service`, `docker`, `kubepods_burstable`,
    /// or `unique`, `unique_hex64` and `unique_pod_uid`): tests running in
    /// parallel share ancestors such as `system.slice`, never a leaf.
    pub fn create(relative_path: &str) -> TestCgroup {
        let relative = relative_path.trim_matches('/');
        assert!(
            !relative.is_empty() && !relative.split('/').any(|c| c.is_empty() || c == ".."),
            "not a cgroup path: {relative_path:?}"
        );
        let root = cgroup2_root();
        let dir = root.join(relative);
        let mut shared = SharedDirs::lock();
        let mut ancestors = Vec::new();
        let mut at = root.to_path_buf();
        let components: Vec<&str> = relative.split('/').collect();
        for (i, component) in components.iter().enumerate() {
            at.push(component);
            let leaf = i + 1 == components.len();
            match fs::create_dir(&at) {
                Ok(()) if !leaf => shared.add(at.clone()),
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !leaf => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // A leftover of a dead run (our names hold our pid),
                    // removable only when empty; a live one is a name two
                    // tests share.
                    fs::remove_dir(&at)
                        .and_then(|()| fs::create_dir(&at))
                        .unwrap_or_else(|e| {
                            panic!(
                                "cgroup {} exists and is in use ({e}): \
                                 its last component must be unique to the test",
                                at.display()
                            )
                        });
                }
                Err(e) => panic!(
                    "creating cgroup {} (needs root; cgroup2 at {}): {e}",
                    at.display(),
                    root.display()
                ),
            }
            if !leaf {
                ancestors.insert(0, at.clone());
            }
        }
        TestCgroup {
            path: format!("/{relative}"),
            dir,
            ancestors,
        }
    }

    /// `system.slice/NAME-<unique>.service`: a systemd service.
    pub fn service(name: &str) -> TestCgroup {
        Self::create(&format!("system.slice/{}.service", unique(name)))
    }

    /// `system.slice/docker-<64 hex>.scope`: a docker container under
    /// systemd's cgroup driver. The hex is `container_id()`.
    pub fn docker() -> TestCgroup {
        Self::create(&format!("system.slice/docker-{}.scope", unique_hex64()))
    }

    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid
    /// with underscores>.slice/cri-containerd-<64 hex>.scope`: a container of
    /// a burstable kubernetes pod under containerd and systemd's driver.
    pub fn kubepods_burstable() -> TestCgroup {
        let uid = unique_pod_uid().replace('-', "_");
        Self::create(&format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{}.scope",
            unique_hex64()
        ))
    }

    /// The cgroup id: the directory's inode, as bpf_get_current_cgroup_id()
    /// returns it for a task in this cgroup.
    pub fn id(&self) -> u64 {
        fs::metadata(&self.dir)
            .unwrap_or_else(|e| panic!("cgroup {}: {e}", self.dir.display()))
            .ino()
    }

    /// Relative to the cgroup2 root, starting with "/": what the `0::` line
    /// of /proc/PID/cgroup shows for a process in it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The directory in the cgroup2 mount.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The 64 hex digits of a docker or containerd scope's name
    /// (`docker-<id>.scope`, `cri-containerd-<id>.scope`), if it is one.
    pub fn container_id(&self) -> Option<&str> {
        let leaf = self.path.rsplit('/').next()?;
        let id = leaf.strip_suffix(".scope")?.rsplit('-').next()?;
        (id.len() == 64).then_some(id)
    }

    /// Moves `pid` (the whole process) into this cgroup.
    pub fn add(&self, pid: u32) {
        let procs = self.dir.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", procs.display()));
    }

    /// The processes in this cgroup (not its descendants).
    pub fn procs(&self) -> Vec<u32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    /// Spawns `cmd` inside this cgroup: the child moves itself in between
    /// fork and exec, so everything the program does happens in it.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        let procs = self.dir.join("cgroup.procs");
        let c_procs = CString::new(procs.as_os_str().as_bytes()).unwrap();
        // SAFETY: between fork and exec the closure calls only open, write
        // and close, which are async-signal-safe, on a path allocated before
        // the fork, and io::Error::last_os_error, which reads errno and does
        // not allocate. Writing "0" to cgroup.procs moves the writing process.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(c_procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = io::Error::last_os_error();
                libc::close(fd);
                if written == 1 {
                    Ok(())
                } else {
                    Err(error)
                }
            });
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?} into {}: {e}", procs.display()))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // What is left in it: out to the test's own cgroup (so the rmdir
        // need not wait for it to die), then killed.
        let own = cgroup_of(std::process::id()).unwrap_or_default();
        let own_procs = cgroup2_root()
            .join(own.trim_start_matches('/'))
            .join("cgroup.procs");
        for pid in self.procs() {
            let _ = fs::write(&own_procs, pid.to_string());
            // SAFETY: signalling a process the test put in its own cgroup.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        // No panic here: a drop while a failed test unwinds would abort.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // EBUSY while a process is still on its way out.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => eprintln!("removing cgroup {}: {e}", self.dir.display()),
                Ok(()) => {}
            }
            break;
        }
        if let Ok(mut shared) = SharedDirs::open() {
            shared.remove_unused(&self.ancestors);
        }
    }
}
