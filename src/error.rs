//! The crate's error type: every fallible library call returns [`Result`].

use thiserror::Error;

/// Errors raised by the engine, the loaders and the models.
#[derive(Debug, Error)]
pub enum Error {
    /// No usable GPU adapter, or the requested one is not present.
    #[error("{0}")]
    NoAdapter(String),
    /// The adapter refused to create a device.
    #[error("could not open the GPU device: {0}")]
    Device(String),
    /// A tensor or dispatch does not fit the device limits.
    #[error("{what} needs {needed} bytes but the device allows at most {limit} bytes ({hint})")]
    TooLarge {
        /// What was being allocated.
        what: String,
        /// Bytes asked for.
        needed: u64,
        /// The device limit.
        limit: u64,
        /// Which limit it was.
        hint: &'static str,
    },
    /// Shapes that do not fit the operation.
    #[error("shape error: {0}")]
    Shape(String),
    /// Bad argument value.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The GPU reported an error: out of memory, the memory budget exceeded, a validation
    /// error (an engine bug) or a lost device. The message says which and what to try.
    #[error("{0}")]
    Gpu(String),
    /// Reading results back from the GPU failed.
    #[error("GPU readback failed: {0}")]
    Readback(String),
    /// A weights or config file is unusable.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// An I/O error, with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand for `std::result::Result<T, vqclip::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an [`Error::Shape`] from anything printable.
    pub fn shape(msg: impl Into<String>) -> Self {
        Error::Shape(msg.into())
    }
    /// Builds an [`Error::Invalid`] from anything printable.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
