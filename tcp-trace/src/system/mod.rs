//! Readers of the kernel's own tables and settings: sock_diag, sysctls, and
//! the owners of sockets found through `/proc`.

mod dir;
pub mod owners;
pub mod sock_diag;
pub mod sysctl;
