//! The recording format: one JSON object per transition, as `watch --json`
//! prints it and `--from FILE` reads it back.

use std::{
    borrow::Cow,
    io::{self, BufRead, Read as _, Write},
    net::IpAddr,
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde::Deserialize;

use super::{errno, Owner, OwnerSource, Placement, SockFields, TcpState, Transition};

/// The longest line a recording may hold. A real one is under 400 bytes;
/// the bound keeps memory fixed whatever the input (`--from /dev/zero`).
pub const MAX_LINE: usize = 64 * 1024;

/// One line of the recording, as read back. Field names are documented in
/// README.md; `format_line` writes the same shape. Every field must be
/// present (`null` is a value, a missing field is an error), except those
/// added in 0.3, which recordings made before lack: those default to unknown.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Record<'a> {
    ts_ns: u64,
    #[serde(borrow)]
    sk: Cow<'a, str>,
    #[serde(default, borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(deserialize_with = "present")]
    pid: Option<u32>,
    #[serde(borrow, deserialize_with = "present")]
    comm: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    owner_source: Option<Cow<'a, str>>,
    #[serde(default)]
    cgroup: Option<String>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    pod_uid: Option<String>,
    #[serde(default)]
    netns: Option<u32>,
    #[serde(borrow)]
    family: Cow<'a, str>,
    laddr: IpAddr,
    lport: u16,
    raddr: IpAddr,
    rport: u16,
    #[serde(borrow)]
    old_state: Cow<'a, str>,
    #[serde(borrow)]
    new_state: Cow<'a, str>,
    #[serde(deserialize_with = "present")]
    duration_ns: Option<u64>,
    #[serde(deserialize_with = "present")]
    bytes_sent: Option<u64>,
    #[serde(deserialize_with = "present")]
    bytes_received: Option<u64>,
    #[serde(borrow, deserialize_with = "present")]
    error: Option<Cow<'a, str>>,
    #[serde(deserialize_with = "present")]
    retransmits: Option<u32>,
    #[serde(deserialize_with = "present")]
    handshake_ns: Option<u64>,
}

/// A nullable field that must still be there: with `deserialize_with`,
/// serde reports a missing field instead of taking it as `null`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::deserialize(d)
}

/// Writes one transition as a JSON line. Hand-formatted into a reused buffer:
/// this runs once per event, and serde's allocations showed in the benchmark.
pub fn write(out: &mut impl Write, t: &Transition) -> io::Result<()> {
    thread_local! {
        static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    LINE.with_borrow_mut(|line| {
        line.clear();
        format_line(line, t);
        out.write_all(line.as_bytes())
    })
}

fn format_line(line: &mut String, t: &Transition) {
    line.push_str(r#"{"ts_ns":"#);
    number(line, t.ts_ns);
    line.push_str(r#","sk":"0x"#);
    hex(line, t.sk);
    line.push_str(if t.accept {
        r#"","event":"accept","pid":"#
    } else {
        r#"","event":"transition","pid":"#
    });
    match &t.owner {
        Some(o) => {
            number(line, u64::from(o.pid));
            line.push_str(r#","comm":"#);
            json_string(line, &String::from_utf8_lossy(&o.comm));
            line.push_str(r#","owner_source":""#);
            line.push_str(o.source.name());
            line.push('"');
        }
        None => line.push_str(r#"null,"comm":null,"owner_source":null"#),
    }
    let placement = t.owner.as_ref().and_then(|o| o.placement.as_deref());
    for (name, value) in [
        ("cgroup", placement.map(|p| p.cgroup.as_str())),
        ("unit", placement.and_then(|p| p.unit.as_deref())),
        ("container", placement.and_then(|p| p.container.as_deref())),
        ("pod_uid", placement.and_then(|p| p.pod_uid.as_deref())),
    ] {
        line.push_str(",\"");
        line.push_str(name);
        line.push_str("\":");
        match value {
            Some(v) => json_string(line, v),
            None => line.push_str("null"),
        }
    }
    line.push_str(r#","netns":"#);
    optional(line, t.netns.map(u64::from));
    line.push_str(if t.is_ipv4() {
        r#","family":"ipv4","laddr":""#
    } else {
        r#","family":"ipv6","laddr":""#
    });
    address(line, t.laddr);
    line.push_str(r#"","lport":"#);
    number(line, u64::from(t.lport));
    line.push_str(r#","raddr":""#);
    address(line, t.raddr);
    line.push_str(r#"","rport":"#);
    number(line, u64::from(t.rport));
    line.push_str(r#","old_state":""#);
    line.push_str(t.old_state.name());
    line.push_str(r#"","new_state":""#);
    line.push_str(t.new_state.name());
    line.push_str(r#"","duration_ns":"#);
    optional(line, t.duration_ns);
    line.push_str(r#","bytes_sent":"#);
    optional(line, t.sock.map(|s| s.bytes_sent));
    line.push_str(r#","bytes_received":"#);
    optional(line, t.sock.map(|s| s.bytes_received));
    line.push_str(r#","error":"#);
    match t.sock.filter(|s| s.error != 0) {
        Some(s) => {
            line.push('"');
            line.push_str(&errno::name(s.error));
            line.push('"');
        }
        None => line.push_str("null"),
    }
    line.push_str(r#","retransmits":"#);
    optional(line, t.retransmits.map(u64::from));
    line.push_str(r#","handshake_ns":"#);
    optional(line, t.handshake_ns);
    line.push_str("}\n");
}

fn number(line: &mut String, v: u64) {
    line.push_str(itoa::Buffer::new().format(v));
}

fn hex(line: &mut String, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        line.push(DIGITS[(v >> (i * 4) & 0xf) as usize] as char);
    }
}

fn address(line: &mut String, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            for (i, octet) in a.octets().iter().enumerate() {
                if i > 0 {
                    line.push('.');
                }
                number(line, u64::from(*octet));
            }
        }
        IpAddr::V6(a) => {
            use std::fmt::Write as _;
            let _ = write!(line, "{a}");
        }
    }
}

fn optional(line: &mut String, value: Option<u64>) {
    match value {
        Some(v) => number(line, v),
        None => line.push_str("null"),
    }
}

/// A JSON string literal: quotes, backslashes and control characters escaped.
fn json_string(line: &mut String, s: &str) {
    use std::fmt::Write as _;
    line.push('"');
    for c in s.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(line, "\\u{:04x}", c as u32);
            }
            c => line.push(c),
        }
    }
    line.push('"');
}

fn parse_line(line: &str) -> Result<Transition> {
    let r: Record = serde_json::from_str(line)?;
    let state =
        |name: &str| TcpState::from_name(name).ok_or_else(|| anyhow!("unknown TCP state `{name}`"));
    let sk =
        r.sk.strip_prefix("0x")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| anyhow!("`sk` is not a hex socket id: `{}`", r.sk))?;
    let ipv4 = match &*r.family {
        "ipv4" => true,
        "ipv6" => false,
        other => bail!("unknown family `{other}`"),
    };
    ensure!(
        r.laddr.is_ipv4() == ipv4 && r.raddr.is_ipv4() == ipv4,
        "addresses do not match family `{}`",
        r.family
    );
    let accept = match r.event.as_deref() {
        None | Some("transition") => false,
        Some("accept") => true,
        Some(other) => bail!("unknown event `{other}`"),
    };
    let owner = match (r.pid, r.comm) {
        (Some(pid), Some(comm)) => {
            let source = match r.owner_source.as_deref() {
                // Recordings before 0.3: owners were seen making transitions.
                None => OwnerSource::Task,
                Some(name) => OwnerSource::from_name(name)
                    .ok_or_else(|| anyhow!("unknown owner_source `{name}`"))?,
            };
            let placement = r.cgroup.map(|cgroup| {
                std::sync::Arc::new(Placement {
                    cgroup,
                    unit: r.unit,
                    container: r.container,
                    pod_uid: r.pod_uid,
                })
            });
            Some(Owner {
                placement,
                ..Owner::process(pid, comm.as_bytes(), source)
            })
        }
        (None, None) => None,
        _ => bail!("`pid` and `comm` must both be set or both be null"),
    };
    let error = match r.error.as_deref() {
        None => 0,
        Some(name) => match errno::from_name(name) {
            Some(e) if e != 0 => e,
            _ => bail!("unknown error `{name}`"),
        },
    };
    let sock = match (r.bytes_sent, r.bytes_received) {
        (Some(bytes_sent), Some(bytes_received)) => Some(SockFields {
            bytes_sent,
            bytes_received,
            error,
        }),
        (None, None) if error == 0 => None,
        (None, None) => bail!("`error` is set without `bytes_sent` and `bytes_received`"),
        _ => bail!("`bytes_sent` and `bytes_received` must both be set or both be null"),
    };
    ensure!(sk != 0, "`sk` is 0, which no socket has");
    // The kernel's monotonic clock counts from boot: no event is at 0, and
    // none lasted longer than the time since boot.
    ensure!(r.ts_ns > 0, "`ts_ns` is 0");
    for (name, value) in [
        ("duration_ns", r.duration_ns),
        ("handshake_ns", r.handshake_ns),
    ] {
        if let Some(v) = value {
            ensure!(
                v <= r.ts_ns,
                "`{name}` {v} is longer than the time since boot (`ts_ns` {})",
                r.ts_ns
            );
        }
    }
    let (old_state, new_state) = (state(&r.old_state)?, state(&r.new_state)?);
    ensure!(
        !accept || old_state == new_state,
        "an accept changing state {} -> {}",
        r.old_state,
        r.new_state
    );
    Ok(Transition {
        ts_ns: r.ts_ns,
        sk,
        owner,
        accept,
        netns: r.netns,
        laddr: r.laddr,
        lport: r.lport,
        raddr: r.raddr,
        rport: r.rport,
        old_state,
        new_state,
        duration_ns: r.duration_ns,
        sock,
        retransmits: r.retransmits,
        handshake_ns: r.handshake_ns,
    })
}

/// Reads a recording, calling `each` per transition. Any bad line (corrupt,
/// truncated, too long, not a transition) is an error naming its line number.
pub fn read(
    mut input: impl BufRead,
    name: &str,
    mut each: impl FnMut(Transition) -> Result<()>,
) -> Result<u64> {
    let mut count = 0;
    let mut buf = Vec::new();
    for number in 1.. {
        buf.clear();
        let read = (&mut input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{name}: reading line {number}"))?;
        if read == 0 {
            break;
        }
        if buf.len() > MAX_LINE {
            bail!("{name}:{number}: line longer than {MAX_LINE} bytes: not a tcp-trace record");
        }
        let line = std::str::from_utf8(&buf)
            .map_err(|_| anyhow!("{name}:{number}: not UTF-8: not a tcp-trace record"))?;
        if line.trim().is_empty() {
            continue;
        }
        let t =
            parse_line(line).with_context(|| format!("{name}:{number}: not a tcp-trace record"))?;
        each(t)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{from_event, sample_event};

    /// Every transition of a recording that must read back whole.
    fn read_all(text: &str) -> Vec<Transition> {
        let mut all = Vec::new();
        read(text.as_bytes(), "recording", |t| {
            all.push(t);
            Ok(())
        })
        .unwrap();
        all
    }

    fn to_line(t: &Transition) -> String {
        let mut out = Vec::new();
        write(&mut out, t).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_has_the_documented_shape() {
        let t = from_event(&sample_event()).unwrap();
        let line = to_line(&t);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let want = serde_json::json!({
            "ts_ns": 1_000_000_000u64, "sk": "0xffff888012345678", "event": "transition",
            "pid": 4242, "comm": "curl", "owner_source": "task",
            "cgroup": null, "unit": null, "container": null, "pod_uid": null,
            "netns": 4026531840u64, "family": "ipv4", "laddr": "127.0.0.1", "lport": 45678,
            "raddr": "10.1.2.3", "rport": 80,
            "old_state": "SYN_SENT", "new_state": "ESTABLISHED", "duration_ns": 317000,
            "bytes_sent": null, "bytes_received": null, "error": null, "retransmits": null,
            "handshake_ns": null
        });
        assert_eq!(v, want);
    }

    #[test]
    fn accepts_round_trip_and_older_recordings_still_read() {
        let mut ev = sample_event();
        ev.flags |= tcp_trace_common::FLAG_ACCEPT;
        ev.old_state = 1;
        ev.new_state = 1;
        ev.owner_source = tcp_trace_common::owner_source::ACCEPT;
        ev.cgroup_id = 0;
        let t = from_event(&ev).unwrap();
        let line = to_line(&t);
        assert!(line.contains(r#""event":"accept""#), "{line}");
        let back = read_all(&line);
        assert_eq!(back, [t]);

        // Before 0.3: no event, owner_source, placement or netns fields.
        let old = r#"{"ts_ns":5,"sk":"0x1","pid":9,"comm":"nc","family":"ipv4","laddr":"127.0.0.1","lport":1,"raddr":"127.0.0.1","rport":2,"old_state":"SYN_SENT","new_state":"ESTABLISHED","duration_ns":3,"bytes_sent":null,"bytes_received":null,"error":null,"retransmits":null,"handshake_ns":null}"#;
        let back = read_all(old);
        let owner = back[0].owner.as_ref().unwrap();
        assert_eq!(
            (owner.source, back[0].accept, back[0].netns),
            (OwnerSource::Task, false, None)
        );

        let bad = old.replace(r#""sk":"0x1","#, r#""sk":"0x1","event":"connect","#);
        assert!(read(bad.as_bytes(), "bad", |_| Ok(())).is_err());
        let bad = old.replace(r#""comm":"nc","#, r#""comm":"nc","owner_source":"guess","#);
        assert!(read(bad.as_bytes(), "bad", |_| Ok(())).is_err());
        let bad = old.replace(r#""sk":"0x1","#, r#""sk":"0x1","event":"accept","#);
        assert!(
            read(bad.as_bytes(), "bad", |_| Ok(())).is_err(),
            "an accept never changes state"
        );
    }

    #[test]
    fn unknowns_are_null() {
        let mut ev = sample_event();
        ev.flags = 0;
        let v: serde_json::Value =
            serde_json::from_str(&to_line(&from_event(&ev).unwrap())).unwrap();
        assert!(v["pid"].is_null() && v["comm"].is_null() && v["duration_ns"].is_null());
    }

    #[test]
    fn round_trips() {
        let mut ev = sample_event();
        ev.family = tcp_trace_common::AF_INET6;
        ev.saddr = "::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        ev.daddr = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        ev.new_state = 7;
        ev.bytes_acked = 1234;
        ev.bytes_received = 99;
        ev.sk_err = 104;
        ev.flags |= tcp_trace_common::FLAG_SOCK_FIELDS;
        // A recording keeps where the owner runs, not the cgroup's id.
        ev.cgroup_id = 0;
        let mut t = from_event(&ev).unwrap();
        t.owner.as_mut().unwrap().placement = Some(std::sync::Arc::new(Placement {
            cgroup: "/kubepods.slice/x\"y".into(),
            unit: Some("cri-containerd-ab.scope".into()),
            container: Some("ab".into()),
            pod_uid: Some("1-2".into()),
        }));
        let line = to_line(&t);
        assert!(line.contains(r#""error":"ECONNRESET""#), "{line}");
        let back = read_all(&line);
        assert_eq!(back, [t]);
    }

    #[test]
    fn corrupt_lines_are_named() {
        let good = to_line(&from_event(&sample_event()).unwrap());
        let cases = [
            format!("{good}{}", &good[..good.len() / 2]), // truncated last line
            format!("{good}{}", good.replace("SYN_SENT", "SYN_SEND")),
            format!("{good}{}", good.replace("\"ipv4\"", "\"ipv6\"")),
            format!("{good}not json\n"),
            format!("{good}{}", good.replace("\"sk\":\"0x", "\"sk\":\"zz")),
            format!(
                "{good}{}",
                good.replace("\"comm\":\"curl\"", "\"comm\":null")
            ),
            format!("{good}{{\"ts_ns\":1}}\n"),
            // A field left out is not a null.
            format!("{good}{}", good.replace(",\"handshake_ns\":null", "")),
            format!(
                "{good}{}",
                good.replace("\"error\":null", "\"error\":\"EBOGUS\"")
            ),
            // An error needs the socket fields it is read with.
            format!(
                "{good}{}",
                good.replace("\"error\":null", "\"error\":\"ECONNRESET\"")
            ),
            // Times that cannot be real.
            format!(
                "{good}{}",
                good.replace("\"ts_ns\":1000000000", "\"ts_ns\":0")
            ),
            format!(
                "{good}{}",
                good.replace("\"duration_ns\":317000", "\"duration_ns\":2000000000")
            ),
            format!("{good}\u{1b}\u{ff}\n"),
        ];
        for input in cases {
            let err = read(input.as_bytes(), "rec.json", |_| Ok(())).unwrap_err();
            assert!(format!("{err:#}").starts_with("rec.json:2:"), "{err:#}");
        }
    }

    #[test]
    fn endless_input_is_refused_within_bounded_memory() {
        let zeros = std::io::repeat(0).take(10 * MAX_LINE as u64);
        let err = read(std::io::BufReader::new(zeros), "/dev/zero", |_| Ok(())).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            format!("/dev/zero:1: line longer than {MAX_LINE} bytes: not a tcp-trace record")
        );
    }

    #[test]
    fn an_empty_recording_has_no_transitions() {
        assert_eq!(read(&b""[..], "empty", |_| Ok(())).unwrap(), 0);
        assert_eq!(read(&b"\n\n"[..], "blank", |_| Ok(())).unwrap(), 0);
    }

    #[test]
    fn hand_written_json_escapes_like_serde() {
        for comm in [
            "curl",
            "a\"b",
            "back\\slash",
            "\u{1b}[31m\n\t",
            "größe\u{7f}",
        ] {
            let mut line = String::new();
            json_string(&mut line, comm);
            let back: String = serde_json::from_str(&line).unwrap();
            assert_eq!(back, comm, "{line}");
        }
    }

    #[test]
    fn hostile_comm_survives_as_text() {
        let mut ev = sample_event();
        ev.comm = *b"\x1b[31m\xff\n\"x\0\0\0\0\0\0\0";
        let line = to_line(&from_event(&ev).unwrap());
        assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
        read(line.as_bytes(), "rec", |_| Ok(())).unwrap();
    }
}
