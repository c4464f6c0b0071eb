//! Time: the kernel's monotonic clock (`bpf_ktime_get_ns`) and the wall
//! clock people read.

/// Converts the kernel's monotonic timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Realtime minus monotonic, in ns.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let offset_ns = clock_ns(libc::CLOCK_REALTIME) as i128 - monotonic_ns() as i128;
        Self { offset_ns }
    }

    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// Local wall-clock time of a monotonic timestamp, as `HH:MM:SS.mmm`.
    pub fn local_time(&self, mono_ns: u64) -> String {
        let real_ns = (mono_ns as i128 + self.offset_ns).max(0);
        let secs = (real_ns / 1_000_000_000) as libc::time_t;
        let millis = (real_ns / 1_000_000 % 1000) as u32;
        // SAFETY: localtime_r writes into the zeroed tm we own.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let ok = !unsafe { libc::localtime_r(&secs, &mut tm) }.is_null();
        if !ok {
            return format!("{secs}.{millis:03}");
        }
        format!(
            "{:02}:{:02}:{:02}.{millis:03}",
            tm.tm_hour, tm.tm_min, tm.tm_sec
        )
    }
}

/// Now on the clock the kernel stamps events with (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
