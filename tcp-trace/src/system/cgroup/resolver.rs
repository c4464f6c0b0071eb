//! Cgroup ids, as `bpf_get_current_cgroup_id` records them, to placements.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{mount::CgroupFs, path::placement_of};
use crate::model::Placement;

/// Most cgroups remembered: hosts have hundreds to a few thousand.
const MAX_ENTRIES: usize = 65_536;

/// Least time between walks, so a flood of unknown ids cannot keep the
/// resolver walking the hierarchy.
const WALK_INTERVAL: Duration = Duration::from_secs(1);

/// Least time between walks for an id newer than any seen: the kernel hands
/// out cgroup ids in increasing order, so such an id is a cgroup made since
/// (a container starting), worth a prompt walk; an older unknown id is one
/// that vanished before any walk saw it, and waits the full interval.
const NEW_ID_WALK_INTERVAL: Duration = Duration::from_millis(50);

/// Resolves cgroup ids by walking the cgroup2 hierarchy when an id is new.
/// 64-bit kernels never reuse a cgroup id, so a remembered one stays right
/// (but for a rename, which the next walk sees).
pub struct Cgroups {
    /// The hierarchy's root; `None` when cgroup2 is not mounted.
    root: Option<PathBuf>,
    known: HashMap<u64, Arc<Placement>>,
    capacity: usize,
    last_walk: Option<Instant>,
    /// The largest id known or asked for.
    newest: u64,
    walks: u64,
    dropped: u64,
}

/// How much resolving has cost.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupStats {
    /// Walks of the hierarchy so far.
    pub walks: u64,
    /// Cgroups remembered.
    pub entries: usize,
    /// Cgroups the latest walk met but had no room for.
    pub dropped: u64,
}

impl Cgroups {
    /// A resolver over this host's cgroup2 mount; without one, nothing
    /// resolves.
    /// The hierarchy is read once now: a cgroup that exists at start but is
    /// gone by the first event that names it (a short-lived container) still
    /// resolves.
    pub fn new() -> Cgroups {
        let mut cgroups = Self::over(
            CgroupFs::find()
                .ok()
                .map(|mount| mount.root().to_path_buf()),
        );
        cgroups.walk(Instant::now());
        cgroups
    }

    /// A resolver over the hierarchy at `root`.
    #[cfg(test)]
    pub fn with_root(root: impl Into<PathBuf>) -> Cgroups {
        Self::over(Some(root.into()))
    }

    fn over(root: Option<PathBuf>) -> Cgroups {
        Cgroups {
            root,
            known: HashMap::new(),
            capacity: MAX_ENTRIES,
            last_walk: None,
            newest: 0,
            walks: 0,
            dropped: 0,
        }
    }

    /// Where the cgroup with this id is; `None` for id 0 (none recorded) and
    /// for ids not found by a walk.
    pub fn resolve(&mut self, id: u64) -> Option<Arc<Placement>> {
        self.resolve_at(id, Instant::now())
    }

    #[cfg(test)]
    pub fn stats(&self) -> CgroupStats {
        CgroupStats {
            walks: self.walks,
            entries: self.known.len(),
            dropped: self.dropped,
        }
    }

    fn resolve_at(&mut self, id: u64, now: Instant) -> Option<Arc<Placement>> {
        if id == 0 {
            return None;
        }
        if !self.known.contains_key(&id) && self.may_walk(id, now) {
            self.walk(now);
        }
        self.newest = self.newest.max(id);
        self.known.get(&id).cloned()
    }

    fn may_walk(&self, id: u64, now: Instant) -> bool {
        let interval = if id > self.newest {
            NEW_ID_WALK_INTERVAL
        } else {
            WALK_INTERVAL
        };
        let rested = |last: Instant| now.saturating_duration_since(last) >= interval;
        self.root.is_some() && self.last_walk.is_none_or(rested)
    }

    /// Remembers the cgroups that exist now, reusing placements already
    /// made; room left over keeps vanished ones, since events about an owner
    /// can arrive after its cgroup is gone.
    fn walk(&mut self, now: Instant) {
        let Some(root) = self.root.clone() else {
            return;
        };
        self.last_walk = Some(now);
        self.walks += 1;
        let mut before = std::mem::take(&mut self.known);
        let (known, capacity) = (&mut self.known, self.capacity);
        let mut dropped = 0;
        visit_tree(&root, |id, path| {
            if known.len() >= capacity {
                dropped += 1;
                return;
            }
            let placement = match before.remove(&id) {
                // Cgroups can be renamed: the id then has a new path.
                Some(placement) if placement.cgroup == path => placement,
                _ => Arc::new(placement_of(path)),
            };
            known.insert(id, placement);
        });
        self.newest = self.newest.max(known.keys().copied().max().unwrap_or(0));
        let room = capacity.saturating_sub(known.len());
        known.extend(before.into_iter().take(room));
        self.dropped = dropped;
    }
}

impl Default for Cgroups {
    fn default() -> Self {
        Self::new()
    }
}

/// Calls `visit` with the inode number and root-relative path of `root` and
/// of every directory below it. Directories that vanish mid-walk, or cannot
/// be read, are passed over.
fn visit_tree(root: &Path, mut visit: impl FnMut(u64, &str)) {
    let Ok(metadata) = fs::metadata(root) else {
        return;
    };
    visit(metadata.ino(), "/");
    let mut pending = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, relative)) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // The type comes with the listing: no stat for the many files
            // in each cgroup.
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            let path = format!("{relative}/{}", entry.file_name().to_string_lossy());
            visit(metadata.ino(), &path);
            pending.push((entry.path(), path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::cgroup::{mount::tests::TempTree, proc_cgroup};

    fn cgroup_of(resolved: Option<Arc<Placement>>) -> Option<String> {
        resolved.map(|placement| placement.cgroup.clone())
    }

    #[test]
    fn resolves_every_directory_of_a_tree() {
        let tree = TempTree::new("cgroups-tree");
        let service = tree.mkdir("system.slice/nginx.service");
        let slice = tree.mkdir("system.slice");
        let user = tree.mkdir("user.slice");
        std::fs::write(tree.0.join("system.slice/cgroup.procs"), "").unwrap();
        let root = std::fs::metadata(&tree.0).unwrap().ino();
        let mut cgroups = Cgroups::with_root(&tree.0);
        let placement = cgroups.resolve(service).unwrap();
        assert_eq!(placement.unit.as_deref(), Some("nginx.service"));
        assert_eq!(placement.cgroup, "/system.slice/nginx.service");
        assert_eq!(
            cgroup_of(cgroups.resolve(slice)).as_deref(),
            Some("/system.slice")
        );
        assert_eq!(
            cgroup_of(cgroups.resolve(user)).as_deref(),
            Some("/user.slice")
        );
        assert_eq!(cgroup_of(cgroups.resolve(root)).as_deref(), Some("/"));
        assert_eq!(cgroups.resolve(0), None);
        let stats = cgroups.stats();
        assert_eq!((stats.walks, stats.entries, stats.dropped), (1, 4, 0));
    }

    #[test]
    fn a_new_cgroup_is_found_once_the_walk_interval_has_passed() {
        let tree = TempTree::new("cgroups-interval");
        let first = tree.mkdir("first.scope");
        let mut cgroups = Cgroups::with_root(&tree.0);
        let start = Instant::now();
        assert!(cgroups.resolve_at(first, start).is_some());
        let later = tree.mkdir("later.scope");
        // Directories stand in for cgroups, and their inode numbers need not
        // grow as cgroup ids do: say this one is older than any seen.
        cgroups.newest = cgroups.newest.max(later);
        let almost = start + WALK_INTERVAL - Duration::from_millis(1);
        assert_eq!(cgroups.resolve_at(later, almost), None);
        assert_eq!(cgroups.stats().walks, 1);
        let placement = cgroups.resolve_at(later, start + WALK_INTERVAL);
        assert_eq!(cgroup_of(placement).as_deref(), Some("/later.scope"));
        assert_eq!(cgroups.stats().walks, 2);
    }

    #[test]
    fn an_id_newer_than_any_seen_is_looked_for_promptly() {
        let tree = TempTree::new("cgroups-newer");
        let first = tree.mkdir("first.scope");
        let mut cgroups = Cgroups::with_root(&tree.0);
        let start = Instant::now();
        assert!(cgroups.resolve_at(first, start).is_some());
        let newer = cgroups.newest + 1;
        assert!(cgroups.may_walk(newer, start + NEW_ID_WALK_INTERVAL));
        assert!(!cgroups.may_walk(newer, start + Duration::from_millis(1)));
        assert!(!cgroups.may_walk(first, start + NEW_ID_WALK_INTERVAL));
        // Asked for once, it is no longer newer than any seen.
        assert_eq!(
            cgroups.resolve_at(newer, start + NEW_ID_WALK_INTERVAL),
            None
        );
        assert_eq!(cgroups.stats().walks, 2);
        assert!(!cgroups.may_walk(newer, start + 2 * NEW_ID_WALK_INTERVAL));
    }

    #[test]
    fn unknown_ids_walk_at_most_once_per_interval() {
        let tree = TempTree::new("cgroups-flood");
        let mut cgroups = Cgroups::with_root(&tree.0);
        let start = Instant::now();
        for unknown in 1_000_000_000..1_000_001_000 {
            assert_eq!(cgroups.resolve_at(unknown, start), None);
        }
        assert_eq!(cgroups.stats().walks, 1);
    }

    #[test]
    fn a_full_table_keeps_the_first_cgroups_and_counts_the_rest() {
        let tree = TempTree::new("cgroups-full");
        for name in ["a", "b", "c", "d"] {
            tree.mkdir(name);
        }
        let mut cgroups = Cgroups::with_root(&tree.0);
        cgroups.capacity = 3;
        let root = std::fs::metadata(&tree.0).unwrap().ino();
        assert!(cgroups.resolve(root).is_some(), "the root is met first");
        let stats = cgroups.stats();
        assert_eq!((stats.entries, stats.dropped), (3, 2));
    }

    #[test]
    fn a_vanished_cgroup_is_remembered_while_there_is_room() {
        let tree = TempTree::new("cgroups-vanished");
        let gone = tree.mkdir("gone.scope");
        let mut cgroups = Cgroups::with_root(&tree.0);
        let start = Instant::now();
        assert!(cgroups.resolve_at(gone, start).is_some());
        // Made before the removal: a plain directory's inode number can be
        // reused at once (a cgroup's id, on 64-bit kernels, never is).
        let new = tree.mkdir("new.scope");
        std::fs::remove_dir(tree.0.join("gone.scope")).unwrap();
        assert!(cgroups.resolve_at(new, start + WALK_INTERVAL).is_some());
        assert!(cgroups.resolve_at(gone, start + WALK_INTERVAL).is_some());
        assert_eq!(cgroups.stats().walks, 2);
    }

    #[test]
    fn without_a_hierarchy_nothing_resolves() {
        let mut cgroups = Cgroups::over(None);
        assert_eq!(cgroups.resolve(1), None);
        assert_eq!(cgroups.stats().walks, 0);
        let mut missing = Cgroups::with_root("/nonexistent/tcp-trace-cgroups");
        assert_eq!(missing.resolve(1), None);
    }

    /// A cgroup made under the real cgroup2 mount, removed when dropped.
    struct TestCgroup(PathBuf);

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    #[test]
    fn resolves_a_cgroup_made_under_the_real_mount() {
        let fs = CgroupFs::find().unwrap();
        let name = format!("tcp-trace-test-{}", std::process::id());
        let cgroup = TestCgroup(fs.root().join(&name));
        std::fs::create_dir(&cgroup.0).unwrap();
        let made = fs.lookup(&format!("/{name}")).unwrap();
        assert_eq!(
            (made.level, made.path.as_str()),
            (1, format!("/{name}").as_str())
        );
        let placement = Cgroups::new().resolve(made.id).unwrap();
        assert_eq!(placement.cgroup, format!("/{name}"));
    }

    /// A child process, killed and reaped when dropped.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn resolves_a_process_moved_into_a_cgroup_of_its_own() {
        let fs = CgroupFs::find().unwrap();
        let name = format!("tcp-trace-test-moved-{}", std::process::id());
        let cgroup = TestCgroup(fs.root().join(&name));
        std::fs::create_dir(&cgroup.0).unwrap();
        // Declared after the cgroup, so it is gone before the rmdir.
        let child = Child(
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id();
        std::fs::write(cgroup.0.join("cgroup.procs"), pid.to_string()).unwrap();
        // What the kernel says of the process, as bpf_get_current_cgroup_id
        // would in its context.
        let path = proc_cgroup(pid).unwrap().unwrap();
        assert_eq!(path, format!("/{name}"));
        let id = fs.lookup(&path).unwrap().id;
        assert_eq!(Cgroups::new().resolve(id).unwrap().cgroup, path);
    }

    #[test]
    fn resolves_this_process_own_cgroup() {
        // The path the kernel shows for this process, and so the id
        // bpf_get_current_cgroup_id returns in its context.
        let path = proc_cgroup(std::process::id()).unwrap().unwrap();
        let id = CgroupFs::find().unwrap().lookup(&path).unwrap().id;
        let placement = Cgroups::new().resolve(id).unwrap();
        assert_eq!(placement.cgroup, path);
    }
}
