use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // The kernel program embeds the shared types: rebuild it when they change.
    println!("cargo:rerun-if-changed=../tcp-trace-common/src");
    let ebpf = Package {
        name: "tcp-trace-ebpf",
        root_dir: "../tcp-trace-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
        .context("building the BPF program (run `cargo xtask setup` first)")
}
