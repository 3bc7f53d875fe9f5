//! The kernel layer: every system call steer makes that aya does not make
//! for it, behind safe, checked calls. All of steer's `unsafe` code lives
//! here, and the raw calls (`sys`) are private to it.
//!
//! One crate for each job: aya for programs, links and typed maps; nix for
//! the file system (statfs, openat, flock, mkdirat, renameat2), mmap and
//! namespaces (setns); rustix for sockets (socket options, addresses),
//! processes (pidfd, euid) and membarrier; the procfs crate for /proc;
//! caps for capabilities; libc only for the raw bpf(2) and ioctl(2) calls
//! none of them wraps.

pub mod bpffs;
pub mod caps;
pub mod cgroup;
pub mod links;
pub mod lock;
pub mod maps;
pub mod netns;
pub mod program;
pub mod socket;
mod sys;
pub mod test_run;

pub use sys::rename_in;
