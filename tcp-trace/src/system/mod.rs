//! Readers of the kernel's own tables and settings: sock_diag, sysctls and
//! the cgroup hierarchy.

pub mod cgroup;
pub mod sock_diag;
pub mod sysctl;
