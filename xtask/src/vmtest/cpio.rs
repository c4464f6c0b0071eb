//! An initramfs writer (directories and regular files): the kernel's `newc` cpio format
//! (Documentation/driver-api/early-userspace/buffer-format.rst), left
//! uncompressed so the guest spends no emulated time unpacking it.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::{ensure, Context as _, Result};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

/// An archive being written; parent directories are added as needed.
pub struct Archive {
    out: BufWriter<File>,
    dirs: BTreeSet<String>,
    names: BTreeSet<String>,
    ino: u32,
}

impl Archive {
    pub fn create(path: &Path) -> Result<Archive> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Archive {
            out: BufWriter::new(file),
            dirs: BTreeSet::new(),
            names: BTreeSet::new(),
            ino: 0,
        })
    }

    /// A directory (and its parents), mode 0755.
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let path = clean(path)?;
        let mut at = String::new();
        for part in path.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if self.dirs.insert(at.clone()) {
                let name = at.clone();
                self.entry(&name, S_IFDIR | 0o755, &[])?;
            }
        }
        Ok(())
    }

    /// A regular file with `mode`'s permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let path = clean(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFREG | (mode & 0o7777), data)
    }

    pub fn finish(mut self) -> Result<()> {
        self.header("TRAILER!!!", 0, 0, 1)?;
        self.out.flush().context("writing the initramfs")?;
        Ok(())
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        ensure!(
            self.names.insert(name.to_string()),
            "{name} is in the initramfs twice"
        );
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        self.header(name, mode, data.len(), nlink)?;
        self.out.write_all(data)?;
        self.pad(data.len())?;
        Ok(())
    }

    fn header(&mut self, name: &str, mode: u32, size: usize, nlink: u32) -> Result<()> {
        ensure!(size <= u32::MAX as usize, "{name} is too large for cpio");
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size as u32,
            0, // dev major, minor
            0,
            0, // rdev major, minor
            0,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name.len() + 1)?;
        Ok(())
    }

    fn pad(&mut self, written: usize) -> Result<()> {
        let pad = (4 - written % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        Ok(())
    }
}

/// A path without leading or doubled slashes and without `.` or `..`.
fn clean(path: &str) -> Result<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    ensure!(
        !parts.is_empty() && parts.iter().all(|p| *p != "." && *p != ".."),
        "bad initramfs path {path:?}"
    );
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use std::{fs, process::Command};

    use super::*;

    /// The archive unpacks with a real cpio (busybox's, as in the guest).
    #[test]
    fn busybox_cpio_unpacks_what_it_wrote() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("out")).unwrap();
        let archive = dir.join("a.cpio");
        let mut a = Archive::create(&archive).unwrap();
        a.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        a.file("usr/lib/x/libc.so.6", 0o644, &[7u8; 1001]).unwrap();
        a.dir("/proc").unwrap();
        assert!(a.file("init", 0o644, b"again").is_err());
        assert!(a.file("../escape", 0o644, b"").is_err());
        a.finish().unwrap();
        let status = Command::new("busybox")
            .args(["cpio", "-i", "-d", "-F"])
            .arg(&archive)
            .current_dir(dir.join("out"))
            .status()
            .unwrap();
        assert!(status.success());
        let out = dir.join("out");
        assert_eq!(fs::read(out.join("init")).unwrap(), b"#!/bin/sh\n");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(out.join("init")).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read(out.join("usr/lib/x/libc.so.6")).unwrap(),
            vec![7u8; 1001]
        );
        assert!(out.join("proc").is_dir());
        fs::remove_dir_all(&dir).unwrap();
    }
}
