//! Readers of the kernel's own tables and settings: sock_diag, sysctls and
//! the cgroup hierarchy.

// Not called yet (the kernel program does not record cgroup ids yet): drop
// this allow when it is.
#[allow(dead_code, unused_imports)]
pub mod cgroup;
pub mod sock_diag;
pub mod sysctl;
