//! One error type for the whole engine. Every variant names what the user must look at:
//! a file, a line in it, a tensor in it, or an option.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem with a whole file (missing, unreadable, unparsable, inconsistent).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A problem at one line of a text file (1-based line number).
    #[error("{}:{line}: {msg}", path.display())]
    Line { path: PathBuf, line: usize, msg: String },
    /// A problem with one tensor of a checkpoint.
    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    Tensor { path: PathBuf, tensor: String, msg: String },
    /// An I/O failure while reading or writing a path.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad options or arguments (names the option).
    #[error("{0}")]
    Invalid(String),
    /// A numerical failure during training (names step and loss term).
    #[error("{0}")]
    Numeric(String),
    /// No usable GPU backend: no driver, no device, kernels not compiled, a CUDA error
    /// while setting up (says which).
    #[error("{0}")]
    Device(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn line(path: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::Line {
            path: path.into(),
            line,
            msg: msg.into(),
        }
    }
    pub fn tensor(path: impl Into<PathBuf>, tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
