//! Readers of the kernel's own tables and settings: sock_diag and sysctls.

pub mod sock_diag;
pub mod sysctl;
