use std::{env, fs, path::PathBuf};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // The kernel program embeds the shared types: rebuild it when they change.
    println!("cargo:rerun-if-changed=../tcp-trace-common/src");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Doc and lint runs: embed an empty object, which the loader refuses.
        let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
        fs::write(out.join("tcp-trace"), b"").context("writing the empty BPF placeholder")?;
    }
    let ebpf = Package {
        name: "tcp-trace-ebpf",
        root_dir: "../tcp-trace-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
        .context("building the BPF program (run `cargo xtask setup` first)")
}
