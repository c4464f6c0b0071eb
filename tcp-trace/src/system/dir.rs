//! A directory listed through libc, for walking `/proc/*/fd`: names come
//! back borrowed and links are read relative to the open directory, so a
//! walk over 100,000 descriptors allocates nothing per entry (std's
//! `read_dir` and `read_link` allocate a name and a path for each).

use std::{ffi::CStr, io, os::fd::RawFd, ptr::NonNull};

/// An open directory stream; closed on drop.
pub(super) struct Dir(NonNull<libc::DIR>);

impl Dir {
    pub(super) fn open(path: &CStr) -> io::Result<Self> {
        // SAFETY: `path` is NUL-terminated.
        let dir = unsafe { libc::opendir(path.as_ptr()) };
        NonNull::new(dir)
            .map(Dir)
            .ok_or_else(io::Error::last_os_error)
    }

    /// The directory's descriptor, to read links relative to it while
    /// `self` lives.
    pub(super) fn raw_fd(&self) -> RawFd {
        // SAFETY: the stream is open.
        unsafe { libc::dirfd(self.0.as_ptr()) }
    }

    /// The next name other than `.` and `..`; `None` at the end. The name
    /// borrows the stream, since the next read may overwrite it.
    pub(super) fn next_name(&mut self) -> io::Result<Option<&CStr>> {
        loop {
            // readdir returns NULL both at the end and on an error; only
            // errno tells them apart.
            // SAFETY: errno is this thread's; the stream is open, and the
            // entry stays valid until the next readdir, which needs `&mut self`.
            let entry = unsafe {
                *libc::__errno_location() = 0;
                libc::readdir(self.0.as_ptr())
            };
            let Some(entry) = NonNull::new(entry) else {
                let err = io::Error::last_os_error();
                return if err.raw_os_error() == Some(0) {
                    Ok(None)
                } else {
                    Err(err)
                };
            };
            // SAFETY: `d_name` is NUL-terminated within the entry.
            let name = unsafe { CStr::from_ptr((*entry.as_ptr()).d_name.as_ptr()) };
            if name != c"." && name != c".." {
                return Ok(Some(name));
            }
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: the stream is open and closed only here.
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}

/// The target of the link `name` in the directory `dir`, into `buf`;
/// `None` if it cannot be read (gone meanwhile). A target that fills `buf`
/// may be cut short.
pub(super) fn read_link_at<'b>(dir: RawFd, name: &CStr, buf: &'b mut [u8]) -> Option<&'b [u8]> {
    // SAFETY: `name` is NUL-terminated and `buf` is writable for its length.
    let len = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(len).ok().map(|len| &buf[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_a_directory_and_reads_its_links() {
        // /proc/self/fd lists, among others, the descriptor reading it.
        let mut fds = Dir::open(c"/proc/self/fd").unwrap();
        let own = fds.raw_fd();
        let own_name = own.to_string();
        let mut buf = [0u8; 64];
        let mut own_link = None;
        while let Some(name) = fds.next_name().unwrap() {
            assert!(name != c"." && name != c"..");
            if name.to_bytes() == own_name.as_bytes() {
                own_link = read_link_at(own, name, &mut buf).map(<[u8]>::to_vec);
            }
        }
        let expected = format!("/proc/{}/fd", std::process::id());
        assert_eq!(own_link.as_deref(), Some(expected.as_bytes()));
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let err = Dir::open(c"/proc/does-not-exist").err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
