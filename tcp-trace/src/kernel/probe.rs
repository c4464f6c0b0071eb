//! What the running kernel offers the agent, and the reason for each thing
//! it does not: for the start-up notes and for diagnosis.

use std::fmt::Display;

/// One optional mechanism or kernel fact the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    /// `None` when available; otherwise why not.
    pub missing: Option<String>,
}

/// The features found (or not) while loading the program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    features: Vec<Feature>,
}

impl Probe {
    pub fn found(&mut self, name: &'static str) {
        self.features.push(Feature {
            name,
            missing: None,
        });
    }

    pub fn missing(&mut self, name: &'static str, reason: impl Display) {
        self.features.push(Feature {
            name,
            missing: Some(reason.to_string()),
        });
    }

    /// Records `name` as found when `reason` is `None`.
    pub fn check(&mut self, name: &'static str, reason: Option<impl Display>) {
        match reason {
            None => self.found(name),
            Some(reason) => self.missing(name, reason),
        }
    }

    /// One line per missing feature, for stderr at start-up.
    pub fn notes(&self) -> impl Iterator<Item = String> + '_ {
        self.features.iter().filter_map(|f| {
            let reason = f.missing.as_ref()?;
            Some(format!("tcp-trace: note: {} unavailable: {reason}", f.name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_name_only_what_is_missing_and_why() {
        let mut p = Probe::default();
        p.found("direct record reads");
        p.missing(
            "SYN-ACK retransmission timing",
            "no tcp:tcp_retransmit_synack",
        );
        p.check("socket byte counts", None::<&str>);
        assert_eq!(p.features.len(), 3);
        let notes: Vec<String> = p.notes().collect();
        assert_eq!(
            notes,
            ["tcp-trace: note: SYN-ACK retransmission timing unavailable: no tcp:tcp_retransmit_synack"]
        );
    }
}
