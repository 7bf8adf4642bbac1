//! Exit statuses and the error that carries one.

/// A job ran and failed.
pub(crate) const JOB_FAILED: u8 = 1;
/// Bad input or usage.
pub(crate) const USAGE: u8 = 2;
/// Refused by policy.
pub(crate) const REFUSED: u8 = 3;

/// An error with the exit status it ends the process with.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) error: anyhow::Error,
}

impl Failure {
    /// Bad input: exit 2.
    pub(crate) fn input(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: USAGE,
            error: error.into(),
        }
    }

    /// Exit with `code`, the details already printed.
    pub(crate) fn quiet(code: u8) -> Failure {
        Failure {
            code,
            error: anyhow::Error::msg(""),
        }
    }

    /// Something that ran failed: exit 1.
    pub(crate) fn failed(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: JOB_FAILED,
            error: error.into(),
        }
    }
}

/// Bad input described by a message: exit 2.
pub(crate) fn input(e: impl std::fmt::Display) -> Failure {
    Failure::input(anyhow::anyhow!("{e}"))
}
