//! The tracepoint `sock:inet_sock_set_state` as tracefs describes it: where
//! tracefs lives (mounting it if needed) and the offsets of the record's fields.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use tcp_trace_common::{SynackLayout, TracepointLayout};

pub const CATEGORY: &str = "sock";
pub const NAME: &str = "inet_sock_set_state";

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Returns the tracefs root, mounting tracefs at /sys/kernel/tracing when no
/// mounted tracefs is found (aya also needs it to attach).
pub fn tracefs_root() -> Result<PathBuf> {
    for root in [TRACEFS, DEBUGFS_TRACING] {
        match fs::metadata(Path::new(root).join("events")) {
            Ok(events) if events.is_dir() => return Ok(root.into()),
            // Mounted, but its root directory (mode 0700) keeps us out.
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                "tracefs is mounted at {root} but this process may not read it: that needs \
                 root or CAP_DAC_READ_SEARCH (or a mode that lets this user in, e.g. \
                 `chmod 0755 {root}`)"
            ),
            _ => {}
        }
    }
    mount_tracefs().with_context(|| {
        format!(
            "tracefs is not mounted and mounting it failed; mount it with \
             `mount -t tracefs nodev {TRACEFS}` (needs CAP_SYS_ADMIN)"
        )
    })?;
    if !Path::new(TRACEFS).join("events").is_dir() {
        bail!("mounted tracefs at {TRACEFS}, but it has no events directory");
    }
    Ok(TRACEFS.into())
}

fn mount_tracefs() -> std::io::Result<()> {
    let source = CString::new("nodev").expect("no NUL");
    let target = CString::new(TRACEFS).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads the record layout of the tracepoint from tracefs.
pub fn read_layout(tracefs: &Path) -> Result<TracepointLayout> {
    let path = tracefs
        .join("events")
        .join(CATEGORY)
        .join(NAME)
        .join("format");
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (the kernel needs the {CATEGORY}:{NAME} tracepoint, Linux 4.16 or later)",
            path.display()
        )
    })?;
    parse_layout(&text).with_context(|| format!("parsing {}", path.display()))
}

/// One `field:` line of a format file.
#[derive(Debug, PartialEq, Eq)]
struct Field<'a> {
    name: &'a str,
    offset: u32,
    size: u32,
}

fn parse_field(line: &str) -> Option<Field<'_>> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.trim().split(';') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("field:") {
            decl = Some(v);
        } else if let Some(v) = part.strip_prefix("offset:") {
            offset = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("size:") {
            size = v.parse().ok();
        }
    }
    // "const void * skaddr" or "__u8 saddr_v6[16]": the name is the last word, less any array suffix.
    let last = decl?.rsplit([' ', '*']).next()?;
    let name = last.split('[').next()?;
    Some(Field {
        name,
        offset: offset?,
        size: size?,
    })
}

/// A lookup of a format file's fields by name and expected size.
fn finder(format: &str) -> impl Fn(&str, u32) -> Result<u32> + '_ {
    let fields: Vec<Field> = format.lines().filter_map(parse_field).collect();
    move |name: &str, size: u32| -> Result<u32> {
        let field = fields
            .iter()
            .find(|f| f.name == name)
            .with_context(|| format!("the tracepoint has no field `{name}` (kernel too old?)"))?;
        if field.size != size {
            bail!("field `{name}` has size {}, expected {size}", field.size);
        }
        Ok(field.offset)
    }
}

/// The layout of `tcp:tcp_retransmit_synack`; an error says why this kernel
/// offers none we can use.
pub fn read_synack_layout(tracefs: &Path) -> Result<SynackLayout> {
    let path = tracefs.join("events/tcp/tcp_retransmit_synack/format");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let find = finder(&text);
    Ok(SynackLayout {
        req: find("req", 8)?,
        sport: find("sport", 2)?,
        dport: find("dport", 2)?,
        family: find("family", 2)?,
        daddr: find("daddr", 4)?,
        daddr_v6: find("daddr_v6", 16)?,
    })
}

/// Offset of `ret` in the record of `syscalls:sys_exit_accept4` (the same in
/// every syscall exit record); an error says why there is none to use.
pub fn read_accept_ret(tracefs: &Path) -> Result<u32> {
    let path = tracefs.join("events/syscalls/sys_exit_accept4/format");
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (the kernel needs CONFIG_FTRACE_SYSCALLS)",
            path.display()
        )
    })?;
    let ret = finder(&text)("ret", 8);
    ret
}

/// Parses a format file into the offsets the kernel program reads, checking
/// that every field it needs is there with the size it expects.
pub fn parse_layout(format: &str) -> Result<TracepointLayout> {
    let find = finder(format);
    Ok(TracepointLayout {
        skaddr: find("skaddr", 8)?,
        oldstate: find("oldstate", 4)?,
        newstate: find("newstate", 4)?,
        sport: find("sport", 2)?,
        dport: find("dport", 2)?,
        family: find("family", 2)?,
        protocol: find("protocol", 2)?,
        saddr: find("saddr", 4)?,
        daddr: find("daddr", 4)?,
        saddr_v6: find("saddr_v6", 16)?,
        daddr_v6: find("daddr_v6", 16)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format file of Linux 6.18, as read from tracefs.
    const FORMAT_6_18: &str = "name: inet_sock_set_state
ID: 1523
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s protocol=%s ...\"
";

    #[test]
    fn parses_the_6_18_layout() {
        // The format this kernel prints is the layout the program compiles in,
        // so it takes the direct-read path here.
        assert_eq!(
            parse_layout(FORMAT_6_18).unwrap(),
            tcp_trace_common::KNOWN_LAYOUT
        );
    }

    #[test]
    fn shifted_offsets_are_followed() {
        let shifted = FORMAT_6_18.replace("offset:30;", "offset:90;");
        assert_eq!(parse_layout(&shifted).unwrap().protocol, 90);
    }

    #[test]
    fn missing_field_is_named() {
        let old = FORMAT_6_18
            .lines()
            .filter(|l| !l.contains("protocol;"))
            .collect::<Vec<_>>()
            .join("\n");
        let err = parse_layout(&old).unwrap_err().to_string();
        assert!(err.contains("`protocol`"), "{err}");
    }

    #[test]
    fn wrong_size_is_rejected() {
        let bad = FORMAT_6_18.replace("sport;\toffset:24;\tsize:2", "sport;\toffset:24;\tsize:4");
        assert!(parse_layout(&bad)
            .unwrap_err()
            .to_string()
            .contains("sport"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_layout("\u{0}\u{ff}field:;offset:x;size:").is_err());
        assert!(parse_layout("").is_err());
    }
}
