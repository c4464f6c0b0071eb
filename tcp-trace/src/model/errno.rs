//! The errno values a TCP connection ends with (`sock.sk_err`), by name.

use std::borrow::Cow;

/// The ones the kernel program also tells apart.
pub use tcp_trace_common::errno::{ECONNREFUSED, ECONNRESET, EPIPE, ETIMEDOUT};

const NAMES: &[(u16, &str)] = &[
    (EPIPE, "EPIPE"),
    (libc::EPROTO as u16, "EPROTO"),
    (libc::ENETUNREACH as u16, "ENETUNREACH"),
    (libc::ECONNABORTED as u16, "ECONNABORTED"),
    (ECONNRESET, "ECONNRESET"),
    (ETIMEDOUT, "ETIMEDOUT"),
    (ECONNREFUSED, "ECONNREFUSED"),
    (libc::EHOSTDOWN as u16, "EHOSTDOWN"),
    (libc::EHOSTUNREACH as u16, "EHOSTUNREACH"),
];

/// `ECONNRESET`, or `E<number>` for values without a name here.
pub fn name(errno: u16) -> Cow<'static, str> {
    match NAMES.iter().find(|(n, _)| *n == errno) {
        Some((_, name)) => Cow::Borrowed(name),
        None => Cow::Owned(format!("E{errno}")),
    }
}

/// The inverse of `name`.
pub fn from_name(name: &str) -> Option<u16> {
    NAMES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(e, _)| *e)
        .or_else(|| name.strip_prefix('E')?.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_programs_numbers_are_this_systems() {
        let ours = [
            super::EPIPE,
            super::ECONNRESET,
            super::ETIMEDOUT,
            super::ECONNREFUSED,
        ];
        let libc = [
            libc::EPIPE,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::ECONNREFUSED,
        ];
        assert_eq!(ours, libc.map(|e| e as u16));
    }

    #[test]
    fn names_round_trip() {
        for errno in [super::ECONNRESET, super::ETIMEDOUT, 113, 9999] {
            assert_eq!(super::from_name(&super::name(errno)), Some(errno));
        }
        assert_eq!(super::name(104), "ECONNRESET");
        assert_eq!(super::from_name("EBOGUS"), None);
    }
}
