//! Transitions as `watch` prints them: aligned columns, or JSON lines in the
//! recording format.

use std::io::{self, Write};

use super::{
    clock::Clock,
    text::{endpoint, human_duration, owner_cells, ContainerColumn},
};
use crate::model::{recording, Transition};

/// How transitions are written out.
pub enum Format {
    Json,
    Text(TextColumns),
}

impl Format {
    pub fn new(json: bool, clock: Clock) -> Self {
        if json {
            Format::Json
        } else {
            Format::Text(TextColumns::new(clock))
        }
    }

    pub fn header(&mut self, out: &mut impl Write) -> io::Result<()> {
        match self {
            Format::Json => Ok(()),
            Format::Text(t) => t.header(out),
        }
    }

    pub fn write(&mut self, out: &mut impl Write, t: &Transition) -> io::Result<()> {
        match self {
            Format::Json => recording::write(out, t),
            Format::Text(cols) => cols.write(out, t),
        }
    }
}

/// Aligned columns. Endpoint columns start wide enough for IPv4 and widen
/// (for the rest of the run) when a longer IPv6 endpoint shows up; a
/// CONTAINER column joins, under a new header, at the first owner in a
/// container.
pub struct TextColumns {
    clock: Clock,
    endpoint_width: usize,
    container: ContainerColumn,
}

impl TextColumns {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            endpoint_width: 21,
            container: ContainerColumn::default(),
        }
    }

    fn header(&self, out: &mut impl Write) -> io::Result<()> {
        let w = self.endpoint_width;
        let header = format!(
            "{:<12} {:>7} {:<16} {:<w$} {:<w$} {:<11}    {:<11} {:>8}",
            "TIME", "PID", "COMM", "LOCAL", "REMOTE", "OLDSTATE", "NEWSTATE", "DURATION"
        );
        writeln!(out, "{}", self.container.header(&header))
    }

    fn write(&mut self, out: &mut impl Write, t: &Transition) -> io::Result<()> {
        if self.container.joins(t.owner.as_ref()) {
            self.header(out)?;
        }
        let local = endpoint(t.laddr, t.lport);
        let remote = endpoint(t.raddr, t.rport);
        self.endpoint_width = self.endpoint_width.max(local.len()).max(remote.len());
        let w = self.endpoint_width;
        let (pid, comm) = owner_cells(t.owner.as_ref());
        let comm = self.container.comm_cells(comm, t.owner.as_ref());
        let duration = t
            .duration_ns
            .map_or_else(|| "-".to_string(), human_duration);
        // An accept changes no state: its duration is the accept-queue wait.
        let new_state = if t.accept {
            "(accepted)"
        } else {
            t.new_state.name()
        };
        writeln!(
            out,
            "{:<12} {pid:>7} {comm:<16} {local:<w$} {remote:<w$} {:<11} -> {new_state:<11} {duration:>8}",
            self.clock.local_time(t.ts_ns),
            t.old_state.name(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{from_event, sample_event};

    #[test]
    fn text_columns_line_up() {
        let clock = Clock::with_offset(0);
        let mut cols = TextColumns::new(clock);
        let mut out = Vec::new();
        cols.header(&mut out).unwrap();
        let t = from_event(&sample_event()).unwrap();
        cols.write(&mut out, &t).unwrap();
        let mut unknown = sample_event();
        unknown.flags = 0;
        cols.write(&mut out, &from_event(&unknown).unwrap())
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str, what: &str| l.find(what).unwrap();
        assert_eq!(col(lines[0], "OLDSTATE"), col(lines[1], "SYN_SENT"));
        assert_eq!(col(lines[1], "SYN_SENT"), col(lines[2], "SYN_SENT"));
        assert!(lines[1].contains(" 4242 curl "), "{}", lines[1]);
        assert!(lines[1].contains("127.0.0.1:45678") && lines[1].ends_with("317us"));
        assert!(
            lines[2].contains("      - -  ") && lines[2].ends_with(" -"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn a_container_column_joins_at_the_first_container() {
        let mut cols = TextColumns::new(Clock::with_offset(0));
        let mut out = Vec::new();
        cols.header(&mut out).unwrap();
        let host = from_event(&sample_event()).unwrap();
        cols.write(&mut out, &host).unwrap();
        let mut contained = host.clone();
        contained.owner.as_mut().unwrap().placement =
            Some(std::sync::Arc::new(crate::model::Placement {
                cgroup: "/docker/x".into(),
                container: Some("0123456789abcdef".repeat(4)),
                ..Default::default()
            }));
        cols.write(&mut out, &contained).unwrap();
        cols.write(&mut out, &host).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(!lines[0].contains("CONTAINER") && lines[2].contains("CONTAINER"));
        let col = |l: &str, what: &str| l.find(what).unwrap();
        assert_eq!(col(lines[2], "CONTAINER"), col(lines[3], "0123456789ab"));
        assert!(
            !lines[3].contains("0123456789abc"),
            "12 digits: {}",
            lines[3]
        );
        assert_eq!(col(lines[2], "LOCAL"), col(lines[4], "127.0.0.1"));
        assert_eq!(col(lines[2], "OLDSTATE"), col(lines[4], "SYN_SENT"));
    }
}
