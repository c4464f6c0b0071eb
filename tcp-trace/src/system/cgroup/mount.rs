//! The cgroup2 mount, as /proc/self/mountinfo lists it, and cgroups in it
//! named by path.

use std::{
    ffi::OsString,
    fs,
    os::unix::{ffi::OsStringExt, fs::MetadataExt},
    path::{Component, Path, PathBuf},
};

use anyhow::{bail, Context, Result};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The mounted cgroup v2 (unified) hierarchy.
#[derive(Clone, Debug)]
pub struct CgroupFs {
    root: PathBuf,
}

/// A cgroup named by path, as the kernel identifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupRef {
    /// Its directory's inode number: on 64-bit kernels the cgroup id.
    pub id: u64,
    /// Components below the root (the root is 0): the level at which
    /// `bpf_get_current_ancestor_cgroup_id` finds this cgroup.
    pub level: u32,
    /// Path relative to the root, starting with `/`.
    pub path: String,
}

impl CgroupFs {
    /// Finds where cgroup2 is mounted: /sys/fs/cgroup on pure v2 hosts,
    /// /sys/fs/cgroup/unified on hybrid ones.
    pub fn find() -> Result<CgroupFs> {
        let mountinfo =
            fs::read_to_string(MOUNTINFO).with_context(|| format!("reading {MOUNTINFO}"))?;
        let root = cgroup2_mount_point(&mountinfo).with_context(|| {
            format!("no mount of fstype cgroup2 (the unified cgroup v2 hierarchy) in {MOUNTINFO}")
        })?;
        Ok(CgroupFs { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cgroup at `path`, given relative to the root (`/system.slice/x`)
    /// or as a full path under the mount.
    pub fn lookup(&self, path: &str) -> Result<CgroupRef> {
        let parts = parts_below(&self.root, path)?;
        let dir = parts
            .iter()
            .fold(self.root.clone(), |dir, part| dir.join(part));
        let metadata = fs::metadata(&dir)
            .with_context(|| format!("cgroup {path}: cannot read {}", dir.display()))?;
        if !metadata.is_dir() {
            bail!("cgroup {path}: {} is not a directory", dir.display());
        }
        Ok(CgroupRef {
            id: metadata.ino(),
            level: u32::try_from(parts.len())
                .with_context(|| format!("cgroup {path}: too deep"))?,
            path: format!("/{}", parts.join("/")),
        })
    }
}

/// The components of `path` below `root`, whether `path` is under `root` or
/// relative to it. `..` is refused: it could leave the hierarchy.
fn parts_below(root: &Path, path: &str) -> Result<Vec<String>> {
    let below = Path::new(path)
        .strip_prefix(root)
        .unwrap_or(Path::new(path));
    let mut parts = Vec::new();
    for component in below.components() {
        match component {
            Component::Normal(name) => parts.push(name.to_string_lossy().into_owned()),
            Component::ParentDir => bail!("cgroup {path}: `..` is not allowed"),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(parts)
}

/// The fields of one mountinfo line that matter here.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    /// The directory of the filesystem that is mounted (`/` for all of it).
    root: PathBuf,
    mount_point: PathBuf,
    fstype: String,
}

/// Where cgroup2 is mounted; of several mounts, one of the whole hierarchy
/// (root `/`) rather than a bind mount of a part of it.
fn cgroup2_mount_point(mountinfo: &str) -> Option<PathBuf> {
    let mounts: Vec<Mount> = mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|mount| mount.fstype == "cgroup2")
        .collect();
    let whole = mounts.iter().find(|mount| mount.root == Path::new("/"));
    whole
        .or(mounts.first())
        .map(|mount| mount.mount_point.clone())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: any
/// number of optional fields (`master:1`) end at a lone `-`, and the
/// filesystem type follows it.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = 6 + fields.get(6..)?.iter().position(|field| *field == "-")?;
    Some(Mount {
        root: unescape(fields[3]),
        mount_point: unescape(fields[4]),
        fstype: fields.get(separator + 1)?.to_string(),
    })
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\134` for `\`).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match (bytes[at], octal_byte(&bytes[at + 1..])) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                at += 4;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// The byte that three octal digits at the start of `digits` spell.
fn octal_byte(digits: &[u8]) -> Option<u8> {
    let digits = digits.get(..3)?;
    if !digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
        return None;
    }
    let value = digits.iter().fold(0u32, |n, d| n * 8 + u32::from(d - b'0'));
    u8::try_from(value).ok()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const PURE_V2: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate
";

    /// A directory tree under the temp dir, removed when dropped.
    pub struct TempTree(pub PathBuf);

    impl TempTree {
        pub fn new(name: &str) -> TempTree {
            let dir = std::env::temp_dir().join(format!("tcp-trace-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempTree(dir)
        }

        /// Makes `relative` (and its parents); its inode number.
        pub fn mkdir(&self, relative: &str) -> u64 {
            let dir = self.0.join(relative);
            fs::create_dir_all(&dir).unwrap();
            fs::metadata(&dir).unwrap().ino()
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_cgroup2_on_hybrid_and_pure_v2_hosts() {
        let unified = cgroup2_mount_point(HYBRID);
        assert_eq!(
            unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        let pure = cgroup2_mount_point(PURE_V2);
        assert_eq!(pure.as_deref(), Some(Path::new("/sys/fs/cgroup")));
    }

    #[test]
    fn no_cgroup2_no_mount_point() {
        assert_eq!(cgroup2_mount_point(""), None);
        let v1_only: String = HYBRID.lines().take(3).map(|l| format!("{l}\n")).collect();
        assert_eq!(cgroup2_mount_point(&v1_only), None);
        assert_eq!(cgroup2_mount_point("garbage\n1 2 3\n- - -\n"), None);
    }

    #[test]
    fn the_whole_hierarchy_is_preferred_to_a_bind_mount_of_part() {
        let mountinfo = "\
50 23 0:26 /system.slice /mnt/part rw - cgroup2 cgroup2 rw
29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        let found = cgroup2_mount_point(mountinfo);
        assert_eq!(found.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        // A part is better than nothing.
        let part = cgroup2_mount_point(mountinfo.lines().next().unwrap());
        assert_eq!(part.as_deref(), Some(Path::new("/mnt/part")));
    }

    #[test]
    fn mountinfo_fields_are_unescaped() {
        let line = r"60 23 0:26 /a\134b /mnt/my\040cgroup\011tab rw shared:9 - cgroup2 none rw";
        let mount = parse_mountinfo_line(line).unwrap();
        assert_eq!(mount.root, Path::new(r"/a\b"));
        assert_eq!(mount.mount_point, Path::new("/mnt/my cgroup\ttab"));
        assert_eq!(mount.fstype, "cgroup2");
        // Not an escape: kept as written.
        assert_eq!(unescape(r"/a\9x\1"), Path::new(r"/a\9x\1"));
        assert_eq!(unescape(r"/a\777"), Path::new(r"/a\777"));
    }

    #[test]
    fn mountinfo_lines_without_a_separator_or_fstype_are_skipped() {
        assert_eq!(
            parse_mountinfo_line("29 23 0:26 / /sys/fs/cgroup rw cgroup2"),
            None
        );
        assert_eq!(
            parse_mountinfo_line("29 23 0:26 / /sys/fs/cgroup rw -"),
            None
        );
        // A `-` before the optional fields is a mount point, not the separator.
        let mount = parse_mountinfo_line("29 23 0:26 / - rw - cgroup2 cgroup2 rw").unwrap();
        assert_eq!(
            (mount.mount_point.as_path(), mount.fstype.as_str()),
            (Path::new("-"), "cgroup2")
        );
    }

    #[test]
    fn lookup_takes_relative_and_full_paths() {
        let tree = TempTree::new("cgroup-lookup");
        let ino = tree.mkdir("a.slice/b.service");
        let fs = CgroupFs {
            root: tree.0.clone(),
        };
        let expected = CgroupRef {
            id: ino,
            level: 2,
            path: "/a.slice/b.service".into(),
        };
        assert_eq!(fs.lookup("/a.slice/b.service").unwrap(), expected);
        assert_eq!(fs.lookup("a.slice/b.service/").unwrap(), expected);
        let full = tree.0.join("a.slice/b.service");
        assert_eq!(fs.lookup(full.to_str().unwrap()).unwrap(), expected);
        let root = fs.lookup("/").unwrap();
        let root_ino = fs::metadata(&tree.0).unwrap().ino();
        assert_eq!(
            root,
            CgroupRef {
                id: root_ino,
                level: 0,
                path: "/".into()
            }
        );
        assert_eq!(fs.lookup(tree.0.to_str().unwrap()).unwrap(), root);
    }

    #[test]
    fn lookup_says_which_path_is_wrong() {
        let tree = TempTree::new("cgroup-lookup-errors");
        tree.mkdir("a.slice");
        fs::write(tree.0.join("a.slice/cgroup.procs"), "").unwrap();
        let fs = CgroupFs {
            root: tree.0.clone(),
        };
        for (path, says) in [
            ("/nope.slice", "cgroup /nope.slice: cannot read"),
            ("/a.slice/cgroup.procs", "is not a directory"),
            ("/a.slice/../../etc", "`..` is not allowed"),
        ] {
            let err = format!("{:#}", fs.lookup(path).unwrap_err());
            assert!(err.contains(says) && err.contains(path), "{path}: {err}");
        }
    }

    #[test]
    fn this_host_has_a_cgroup2_mount_whose_root_is_cgroup_1() {
        let fs = CgroupFs::find().unwrap();
        let root = fs.lookup("/").unwrap();
        // The root cgroup's id is 1 (kernfs numbers its root first).
        assert_eq!(
            root,
            CgroupRef {
                id: 1,
                level: 0,
                path: "/".into()
            }
        );
    }
}
