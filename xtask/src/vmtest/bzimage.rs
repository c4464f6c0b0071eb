//! The uncompressed ELF `vmlinux` inside a bzImage (`vmlinuz`): QEMU boots it
//! directly through its PVH note, which under TCG saves the seconds the
//! kernel's own decompressor takes (XZ on Debian's 6.1, zstd on 6.12).

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    thread,
};

use anyhow::{bail, ensure, Context as _, Result};

/// How the kernel compressed its payload, from the payload's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
}

impl Compression {
    fn sniff(payload: &[u8]) -> Option<Compression> {
        if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Some(Compression::Xz)
        } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else {
            None
        }
    }

    /// The command line tool that decompresses it from stdin to stdout.
    fn tool(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }
}

/// The compressed kernel inside a bzImage, from its boot protocol header
/// (Documentation/arch/x86/boot.rst): `setup_sects` at 0x1f1, the "HdrS"
/// magic at 0x202, `payload_offset` and `payload_length` at 0x248 and 0x24c,
/// the offset counted from the protected-mode code after the setup sectors.
/// The kernel's build appends the uncompressed size (4 bytes) to the
/// compressed stream; that trailer is cut off here.
pub fn payload(image: &[u8]) -> Result<(Compression, &[u8])> {
    ensure!(image.len() > 0x250, "too short for a bzImage");
    ensure!(&image[0x202..0x206] == b"HdrS", "no bzImage header (HdrS)");
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    ensure!(
        version >= 0x0208,
        "boot protocol {version:#x} has no payload fields (needs 2.08)"
    );
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let word = |at: usize| u32::from_le_bytes(image[at..at + 4].try_into().unwrap()) as usize;
    let start = (setup_sects + 1) * 512 + word(0x248);
    let len = word(0x24c);
    ensure!(
        len > 4 && start + len <= image.len(),
        "payload {start}+{len} lies outside the {}-byte image",
        image.len()
    );
    let payload = &image[start..start + len - 4];
    let compression = Compression::sniff(payload).with_context(|| {
        format!(
            "unknown payload compression (starts {:02x?})",
            &payload[..6]
        )
    })?;
    Ok((compression, payload))
}

/// Writes the ELF vmlinux in `vmlinuz` to `out`.
pub fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<Compression> {
    let image = std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let (compression, payload) =
        payload(&image).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let elf = decompress(compression, payload)?;
    ensure!(
        elf.starts_with(b"\x7fELF"),
        "{}: the decompressed payload is no ELF file",
        vmlinuz.display()
    );
    std::fs::write(out, &elf).with_context(|| format!("writing {}", out.display()))?;
    Ok(compression)
}

/// Runs the compression's CLI (xz-utils or zstd, which `cargo xtask setup`
/// installs) over `data`.
pub fn decompress(compression: Compression, data: &[u8]) -> Result<Vec<u8>> {
    let tool = compression.tool();
    let mut child = Command::new(tool)
        .args(["-d", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool} (cargo xtask setup installs it)"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let output = thread::scope(|scope| {
        scope.spawn(move || stdin.write_all(data));
        child.wait_with_output()
    })
    .with_context(|| format!("running {tool}"))?;
    if !output.status.success() {
        bail!(
            "{tool} -d failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped buffer: header fields set, `payload` placed at the
    /// offset they name, with the 4-byte size trailer the kernel appends.
    fn image(setup_sects: u8, offset: usize, payload: &[u8]) -> Vec<u8> {
        let code = (setup_sects.max(1) as usize + 1) * 512;
        let mut image = vec![0u8; code + offset + payload.len() + 4 + 16];
        image[0x1f1] = setup_sects;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&(offset as u32).to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        image[code + offset..code + offset + payload.len()].copy_from_slice(payload);
        image
    }

    #[test]
    fn finds_the_payload_the_header_names_without_its_size_trailer() {
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2, 3];
        let img = image(27, 1000, &xz);
        assert_eq!(payload(&img).unwrap(), (Compression::Xz, &xz[..]));
        let zstd = [0x28, 0xb5, 0x2f, 0xfd, 9, 9];
        assert_eq!(
            payload(&image(3, 0, &zstd)).unwrap(),
            (Compression::Zstd, &zstd[..])
        );
    }

    #[test]
    fn refuses_what_is_no_bzimage_or_an_unknown_compression() {
        let mut img = image(4, 10, &[0x1f, 0x8b, 8, 0, 0, 0]);
        assert!(payload(&img)
            .unwrap_err()
            .to_string()
            .contains("unknown payload compression"));
        img[0x202] = b'X';
        assert!(payload(&img).is_err());
        assert!(payload(&[0u8; 100]).is_err());
        let mut short = image(4, 10, &[0x28, 0xb5, 0x2f, 0xfd]);
        short[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(payload(&short).is_err());
    }

    #[test]
    fn decompresses_with_the_real_tools() {
        for (compression, tool) in [(Compression::Xz, "xz"), (Compression::Zstd, "zstd")] {
            let mut child = Command::new(tool)
                .args(["-c", "-q"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"\x7fELF and the rest")
                .unwrap();
            let packed = child.wait_with_output().unwrap().stdout;
            assert_eq!(Compression::sniff(&packed), Some(compression));
            assert_eq!(
                decompress(compression, &packed).unwrap(),
                b"\x7fELF and the rest"
            );
        }
    }
}
