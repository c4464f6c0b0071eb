//! Readers of the kernel's own tables and settings: sock_diag, sysctls, TCP
//! counters (`netstat`), the cgroup hierarchy, the owners of sockets found
//! through `/proc`, and the agent's own usage.

pub mod cgroup;
mod dir;
pub mod netstat;
pub mod owners;
pub mod proc_net;
pub mod sock_diag;
pub mod sysctl;
pub mod usage;
