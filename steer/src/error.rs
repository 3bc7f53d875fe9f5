//! The library's error type: what went wrong, as a kind a caller can match
//! on, with the message a user reads. Front ends print the whole chain
//! (`{:#}` through anyhow): "context: cause: root cause".

use std::{fmt, io, path::PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: an argument, a file's content, a socket or process that
    /// cannot be used. Nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// A request that conflicts with the current state (already bound,
    /// already attached, not steered...).
    #[error("{0}")]
    Conflict(String),
    #[error("no steer state at {}: run `steerctl load` first, or pass the --pin-dir it was loaded with", dir.display())]
    NotLoaded { dir: PathBuf },
    #[error("already loaded: {} exists; run `steerctl --pin-dir {} unload` first", pin.display(), dir.display())]
    AlreadyLoaded { pin: PathBuf, dir: PathBuf },
    #[error(
        "{} is not on a bpf filesystem; mount it with `mount -t bpf bpf {mp}`; in a container, give it the host's: \
         `-v {mp}:{mp}` (podman, docker) or a hostPath volume for {mp} (Kubernetes)",
        path.display(),
        mp = mount_point.display()
    )]
    NotBpffs { path: PathBuf, mount_point: PathBuf },
    /// A pin that is missing, or not the object steer expects there.
    #[error("{0}")]
    Pin(String),
    /// Missing capabilities or permissions.
    #[error("{0}")]
    Permission(String),
    /// The kernel lacks a feature steer needs.
    #[error("{0}")]
    Kernel(String),
    /// A map has no room left.
    #[error("{0}")]
    Full(String),
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Errno(#[from] nix::Error),
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    /// Made by the `From` impl below, which turns a verifier refusal for want
    /// of CAP_PERFMON into Permission.
    #[error(transparent)]
    Program(aya::programs::ProgramError),
    #[error(transparent)]
    Link(#[from] aya::programs::links::LinkError),
    #[error(transparent)]
    PinObject(aya::pin::PinError),
    #[error(transparent)]
    Ebpf(#[from] aya::EbpfError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
}

impl Error {
    /// The innermost error, past every context.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            other => other,
        }
    }

    /// The error and its causes on one line, "context: cause: root cause",
    /// as anyhow's `{:#}` prints them.
    pub fn chain(&self) -> String {
        std::iter::successors(Some(self as &dyn std::error::Error), |e| e.source())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ")
    }

    /// The OS error number at the root, if the root is an OS error.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self.root() {
            Error::Io(e) => e.raw_os_error(),
            Error::Errno(e) => Some(*e as i32),
            _ => None,
        }
    }
}

/// The verifier refusing the program for want of CAP_PERFMON says so.
impl From<aya::programs::ProgramError> for Error {
    fn from(e: aya::programs::ProgramError) -> Self {
        use aya::programs::ProgramError;
        match &e {
            ProgramError::LoadError { io_error, .. } if io_error.raw_os_error() == Some(libc::EACCES) => {
                crate::preflight::verifier_refusal_hint().map_or(Error::Program(e), Error::Permission)
            }
            _ => Error::Program(e),
        }
    }
}

/// A pin refused for a read-only mount says which mount and what to do.
impl From<aya::pin::PinError> for Error {
    fn from(e: aya::pin::PinError) -> Self {
        match &e {
            aya::pin::PinError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EROFS) => {
                Error::Permission(format!("{e}: {}", crate::bpffs::read_only_hint()))
            }
            _ => Error::PinObject(e),
        }
    }
}

/// Adds a line of context to an error, like anyhow's `Context`.
pub trait Context<T> {
    fn context<C: fmt::Display>(self, context: C) -> Result<T>;
    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context<C: fmt::Display>(self, context: C) -> Result<T> {
        self.map_err(|e| Error::Context { context: context.to_string(), source: Box::new(e.into()) })
    }

    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::Context { context: f().to_string(), source: Box::new(e.into()) })
    }
}

/// Returns `Error::$kind(format!(...))` from the enclosing function.
macro_rules! fail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$kind(format!($($arg)*)))
    };
}
pub(crate) use fail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_chains_and_keeps_the_root() {
        let err: Result<()> = Err(io::Error::from_raw_os_error(libc::EPERM)).context("opening x").context("loading");
        let err = err.unwrap_err();
        assert_eq!(err.to_string(), "loading");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert!(err.chain().starts_with("loading: opening x: "), "{}", err.chain());
    }

    #[test]
    fn bpffs_errors_say_what_a_container_lacks() {
        let err = Error::NotBpffs { path: "/sys/fs/bpf".into(), mount_point: "/sys/fs/bpf".into() };
        let text = err.to_string();
        assert!(
            text.starts_with("/sys/fs/bpf is not on a bpf filesystem; mount it with `mount -t bpf bpf /sys/fs/bpf`")
        );
        assert!(text.contains("`-v /sys/fs/bpf:/sys/fs/bpf` (podman, docker)") && text.contains("hostPath"), "{text}");

        let pin = |errno| {
            Error::from(aya::pin::PinError::SyscallError(aya::sys::SyscallError {
                call: "BPF_OBJ_PIN",
                io_error: io::Error::from_raw_os_error(errno),
            }))
        };
        let read_only = pin(libc::EROFS);
        assert!(matches!(read_only, Error::Permission(_)), "{read_only:?}");
        let text = read_only.to_string();
        assert!(text.starts_with("`BPF_OBJ_PIN` failed: the bpf filesystem is mounted read-only"), "{text}");
        assert!(text.contains("no `:ro`") && text.contains("readOnly: true"), "{text}");
        // Any other failure is aya's, unchanged.
        assert!(matches!(pin(libc::EEXIST), Error::PinObject(_)));
    }
}
