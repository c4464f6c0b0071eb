//! nftables rules a test installs to drop chosen packets.

use std::{
    io::Write,
    process::{Command, Stdio},
};

/// An nftables table of the test's own, deleted when dropped (even when the
/// test fails), holding `output` rules.
pub struct NftTable {
    name: String,
}

impl NftTable {
    pub fn new(name: &str, rules: &[String]) -> NftTable {
        let table = NftTable {
            name: name.to_string(),
        };
        let mut script = format!(
            "table inet {name} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n"
        );
        for rule in rules {
            script.push_str(&format!("  {rule}\n"));
        }
        script.push_str(" }\n}\n");
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("running nft (Debian package nftables; cargo xtask setup installs it)");
        nft.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft rejected:\n{script}");
        table
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.name])
            .status();
    }
}
