//! Just enough of the BPF Type Format to find where a struct member lives in
//! the running kernel: the offsets the kernel program reads socket fields at.
//!
//! Rust BPF code gets no CO-RE relocations, so userspace resolves offsets from
//! `/sys/kernel/btf/vmlinux` and hands them to the program as globals.

use std::fs;

use anyhow::{bail, ensure, Context as _, Result};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

/// One type's header; members are decoded on demand.
#[derive(Debug, Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    /// `size` for INT/STRUCT/UNION/ENUM, the referenced type id for modifiers.
    size_or_type: u32,
    /// Where its members start in the type section.
    members_at: usize,
}

/// One BTF blob, indexed by type id but otherwise left undecoded, so that
/// reading the kernel's ~150,000 types costs little more than the file.
pub struct Btf {
    data: Vec<u8>,
    /// Where the type and string sections lie in `data`.
    types: std::ops::Range<usize>,
    strings: std::ops::Range<usize>,
    /// Offset of each type in the type section; index = type id - 1.
    index: Vec<u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data.get(at..at + 4).context("BTF data truncated")?;
    Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf> {
        let data = fs::read(VMLINUX).with_context(|| {
            format!("reading {VMLINUX} (the kernel needs CONFIG_DEBUG_INFO_BTF)")
        })?;
        Btf::parse(data).with_context(|| format!("parsing {VMLINUX}"))
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf> {
        ensure!(data.len() >= 24, "too short for a BTF header");
        let magic = u16::from_le_bytes([data[0], data[1]]);
        ensure!(magic == MAGIC, "not little-endian BTF (magic {magic:#x})");
        let hdr_len = u32_at(&data, 4)? as usize;
        let (type_off, type_len) = (u32_at(&data, 8)? as usize, u32_at(&data, 12)? as usize);
        let (str_off, str_len) = (u32_at(&data, 16)? as usize, u32_at(&data, 20)? as usize);
        let section = |off: usize, len: usize| {
            let range = hdr_len + off..hdr_len + off + len;
            ensure!(range.end <= data.len(), "BTF section out of bounds");
            Ok(range)
        };
        let (types_range, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
        let types = &data[types_range.clone()];

        let mut index = Vec::new();
        let mut at = 0;
        while at < types.len() {
            index.push(at as u32);
            let info = u32_at(types, at + 4)?;
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                KIND_STRUCT | KIND_UNION => vlen * 12,
                KIND_INT | 14 | 17 => 4, // INT, VAR, DECL_TAG
                KIND_ARRAY => 12,
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                KIND_PTR | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12
                | 16 | KIND_TYPE_TAG => 0,
                other => bail!("unknown BTF kind {other} at type {}", index.len()),
            };
            at += 12 + extra;
            ensure!(
                at <= types.len(),
                "type {} runs past the type section",
                index.len()
            );
        }
        Ok(Btf {
            types: types_range,
            strings,
            index,
            data,
        })
    }

    fn types(&self) -> &[u8] {
        &self.data[self.types.clone()]
    }

    fn ty(&self, id: u32) -> Option<Type> {
        let at = *self.index.get((id as usize).checked_sub(1)?)? as usize;
        let types = self.types();
        let info = u32_at(types, at + 4).ok()?;
        Some(Type {
            name_off: u32_at(types, at).ok()?,
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 == 1,
            vlen: (info & 0xffff) as usize,
            size_or_type: u32_at(types, at + 8).ok()?,
            members_at: at + 12,
        })
    }

    fn members(&self, ty: Type) -> impl Iterator<Item = Member> + '_ {
        (0..ty.vlen).filter_map(move |i| {
            let m = ty.members_at + i * 12;
            let types = self.types();
            let raw_offset = u32_at(types, m + 8).ok()?;
            Some(Member {
                name_off: u32_at(types, m).ok()?,
                type_id: u32_at(types, m + 4).ok()?,
                // With kind_flag the top 8 bits hold a bitfield size.
                bit_offset: if ty.kind_flag {
                    raw_offset & 0xff_ffff
                } else {
                    raw_offset
                },
            })
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let strings = &self.data[self.strings.clone()];
        let rest = strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn strip_modifiers(&self, mut id: u32) -> Option<Type> {
        for _ in 0..32 {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// Bytes of an array of integers (`char comm[16]`); `None` for others.
    fn array_size(&self, array: Type) -> Option<u32> {
        let types = self.types();
        let elem = self.strip_modifiers(u32_at(types, array.members_at).ok()?)?;
        let count = u32_at(types, array.members_at + 8).ok()?;
        (elem.kind == KIND_INT).then(|| elem.size_or_type.checked_mul(count))?
    }

    /// Byte offset and size of `member` in `struct name`, looking through
    /// anonymous struct and union members.
    pub fn member(&self, name: &str, member: &str) -> Option<(u32, u32)> {
        let ty = self.named(KIND_STRUCT, name)?;
        self.find_member(ty, member.as_bytes(), 0)
    }

    fn named(&self, kind: u32, name: &str) -> Option<Type> {
        (1..=self.index.len() as u32)
            .filter_map(|id| self.ty(id))
            .find(|t| t.kind == kind && self.name(t.name_off) == name.as_bytes())
    }

    fn find_member(&self, ty: Type, member: &[u8], base_bits: u32) -> Option<(u32, u32)> {
        for m in self.members(ty) {
            let bits = base_bits + m.bit_offset;
            let target = self.strip_modifiers(m.type_id)?;
            if m.name_off == 0 && matches!(target.kind, KIND_STRUCT | KIND_UNION) {
                if let Some(found) = self.find_member(target, member, bits) {
                    return Some(found);
                }
            } else if self.name(m.name_off) == member {
                if !bits.is_multiple_of(8) {
                    return None;
                }
                let size = match target.kind {
                    KIND_INT | KIND_STRUCT | KIND_UNION => target.size_or_type,
                    // Pointers are 8 bytes on every 64-bit kernel BTF describes.
                    KIND_PTR => 8,
                    KIND_ARRAY => self.array_size(target)?,
                    _ => return None,
                };
                return Some((bits / 8, size));
            }
        }
        None
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Builds a BTF blob: `u64` and `int` INTs, and
    /// `struct tcp_sock { int pad; union { int x; int sk_err; }; u64 bytes_acked; }`.
    pub fn sample() -> Vec<u8> {
        let strings = b"\0u64\0int\0tcp_sock\0pad\0x\0sk_err\0bytes_acked\0".to_vec();
        let off = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
        push(&[off("u64"), KIND_INT << 24, 8, 64]); // 1
        push(&[off("int"), KIND_INT << 24, 4, 32]); // 2
        push(&[
            0,
            KIND_UNION << 24 | 2,
            4,
            off("x"),
            2,
            0,
            off("sk_err"),
            2,
            0,
        ]); // 3
        push(&[off("tcp_sock"), KIND_STRUCT << 24 | 3, 16]); // 4
        push(&[off("pad"), 2, 0, 0, 3, 32, off("bytes_acked"), 1, 64]);
        let mut blob = Vec::new();
        blob.extend(MAGIC.to_le_bytes());
        blob.extend([1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend(w.to_le_bytes());
        }
        blob.extend(&types);
        blob.extend(&strings);
        blob
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.member("tcp_sock", "bytes_acked"), Some((8, 8)));
        assert_eq!(btf.member("tcp_sock", "sk_err"), Some((4, 4)));
        assert_eq!(btf.member("tcp_sock", "nope"), None);
        assert_eq!(btf.member("udp_sock", "pad"), None);
    }

    #[test]
    fn corrupt_btf_is_an_error() {
        let good = sample();
        assert!(Btf::parse(good[..10].to_vec()).is_err());
        assert!(Btf::parse(good[..good.len() - 20].to_vec()).is_err());
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(Btf::parse(bad).is_err());
    }

    #[test]
    fn reads_this_kernels_tcp_sock() {
        // The running kernel must have BTF (checked in platform notes); its
        // counters are u64 and sk_err an int, wherever they sit.
        let btf = Btf::from_sys_fs().unwrap();
        let (_, acked) = btf.member("tcp_sock", "bytes_acked").unwrap();
        let (_, received) = btf.member("tcp_sock", "bytes_received").unwrap();
        let (_, err) = btf.member("sock", "sk_err").unwrap();
        let (_, flags) = btf.member("sock_common", "skc_flags").unwrap();
        assert!(btf.member("sock", "__sk_common").is_some());
        assert_eq!((acked, received, err, flags), (8, 8, 4, 8));
        // Pointer members, followed by the accept handler.
        assert_eq!(btf.member("task_struct", "files").map(|m| m.1), Some(8));
        assert_eq!(btf.member("socket", "sk").map(|m| m.1), Some(8));
        // An array of chars, followed by the listener-owner exit handler.
        assert_eq!(btf.member("task_struct", "comm").map(|m| m.1), Some(16));
    }
}
