//! Cgroup v2 ids, as the kernel program records them, to where their
//! processes run: the cgroup's path, systemd unit, container and pod.

mod path;

pub use self::path::{placement_of, Placement};
