//! The errno values a TCP connection ends with (`sock.sk_err`), by name.

use std::borrow::Cow;

pub const EPIPE: u16 = libc::EPIPE as u16;
pub const ECONNRESET: u16 = libc::ECONNRESET as u16;
pub const ETIMEDOUT: u16 = libc::ETIMEDOUT as u16;
pub const ECONNREFUSED: u16 = libc::ECONNREFUSED as u16;

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
    fn names_round_trip() {
        for errno in [super::ECONNRESET, super::ETIMEDOUT, 113, 9999] {
            assert_eq!(super::from_name(&super::name(errno)), Some(errno));
        }
        assert_eq!(super::name(104), "ECONNRESET");
        assert_eq!(super::from_name("EBOGUS"), None);
    }
}
