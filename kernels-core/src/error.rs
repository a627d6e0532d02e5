//! The one error type of the crate family.

use core::fmt;

/// Everything that can go wrong at a public entry point of the family.
///
/// Each variant carries what a caller needs to act on it: the operand, what was expected and what
/// was found. Backends add their own failure modes (device lost, out of memory) as new variants,
/// hence `#[non_exhaustive]`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Two operands (or an operand and a parameter) disagree on a matrix shape.
    ShapeMismatch {
        /// The operand whose shape is wrong, e.g. `"x"` or `"w_t"`.
        what: &'static str,
        /// The shape the op needs, `[rows, cols]`.
        expected: [usize; 2],
        /// The shape it was given.
        found: [usize; 2],
    },
    /// A vector or slice has the wrong length.
    LengthMismatch {
        /// The operand whose length is wrong.
        what: &'static str,
        /// The length the op needs.
        expected: usize,
        /// The length it was given.
        found: usize,
    },
    /// A buffer cannot hold the matrix it is said to hold.
    InvalidView {
        /// The operand.
        what: &'static str,
        /// Rows of the view.
        rows: usize,
        /// Columns of the view.
        cols: usize,
        /// Distance in elements between the starts of consecutive rows.
        row_stride: usize,
        /// Length of the buffer.
        len: usize,
    },
    /// A scalar parameter is outside its domain.
    InvalidParam {
        /// The parameter's name as it appears in the op's params type.
        name: &'static str,
        /// The value given (integers are widened to `f64`).
        value: f64,
        /// The domain, in words, e.g. `"in (0, 1]"`.
        expected: &'static str,
    },
    /// Bytes handed to a decoder are not a valid encoding.
    BadFormat {
        /// Byte offset at which decoding failed.
        offset: usize,
        /// What was wrong there.
        reason: &'static str,
    },
    /// An op that rejects NaN or infinity was given one.
    NonFinite {
        /// The operand.
        what: &'static str,
        /// Index (flattened, row-major) of the first non-finite element.
        index: usize,
    },
    /// An iterative method did not meet its convergence criterion within its iteration bound.
    NotConverged {
        /// The method.
        what: &'static str,
        /// Iterations (sweeps) performed.
        iterations: usize,
    },
    /// The backend cannot do what was asked: an instruction set this CPU lacks, a feature the
    /// GPU adapter does not offer.
    Unsupported {
        /// What was asked for, e.g. `"AVX-512 (avx512f)"`.
        feature: &'static str,
        /// How to get it or what to use instead.
        hint: &'static str,
    },
    /// A factorisation met a pivot at or below its small-pivot guard.
    Singular {
        /// The factorisation.
        what: &'static str,
        /// Index of the offending pivot.
        index: usize,
    },
    /// A size computed from the arguments (the elements of a shape, the bytes of a buffer, the
    /// workgroups of a dispatch) exceeds what this platform or device can address.
    TooLarge {
        /// What was being sized.
        what: &'static str,
        /// The most there can be, in `unit`s.
        limit: u64,
        /// What `limit` counts, e.g. `"elements"` or `"workgroups"`.
        unit: &'static str,
    },
    /// A result of finite input is too large for its element type (the `R` of a QR of columns
    /// whose norm exceeds `f32::MAX`, say): scale the input down.
    Overflow {
        /// The result that overflows.
        what: &'static str,
    },
    /// An allocation (on the host or on a device) failed: not enough memory.
    OutOfMemory {
        /// What was being allocated.
        what: &'static str,
        /// Bytes asked for.
        bytes: u64,
    },
    /// The device was lost (driver reset, device removed or destroyed) or rejected a command;
    /// nothing more runs on it. Create a new context.
    DeviceFailure {
        /// What happened.
        reason: &'static str,
    },
    /// A multi-pass streaming computation ([`crate::MultiPass`]) was driven out of order: a call
    /// in the wrong pass, or a later pass that did not see the same entries as the first.
    PassOrder {
        /// The call, e.g. `"StreamingTopK::feed"`.
        what: &'static str,
        /// What the protocol expects at this point.
        expected: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShapeMismatch {
                what,
                expected,
                found,
            } => write!(
                f,
                "`{what}` has shape {}x{} but this op needs {}x{}",
                found[0], found[1], expected[0], expected[1]
            ),
            Self::LengthMismatch {
                what,
                expected,
                found,
            } => {
                write!(
                    f,
                    "`{what}` has length {found} but this op needs length {expected}"
                )
            }
            Self::InvalidView {
                what,
                rows,
                cols,
                row_stride,
                len,
            } => write!(
                f,
                "`{what}`: a {rows}x{cols} view with row stride {row_stride} does not fit in a \
                 buffer of {len} elements (the stride must be >= cols and the buffer must reach \
                 the end of the last row)"
            ),
            Self::InvalidParam {
                name,
                value,
                expected,
            } => {
                write!(
                    f,
                    "parameter `{name}` = {value} is invalid: it must be {expected}"
                )
            }
            Self::BadFormat { offset, reason } => {
                write!(f, "invalid encoded data at byte {offset}: {reason}")
            }
            Self::NonFinite { what, index } => write!(
                f,
                "`{what}` holds a NaN or infinity at flat index {index}, which this op rejects"
            ),
            Self::NotConverged { what, iterations } => write!(
                f,
                "{what} did not converge within {iterations} iterations; the input is likely \
                 badly scaled or not finite"
            ),
            Self::Unsupported { feature, hint } => {
                write!(f, "{feature} is not available here: {hint}")
            }
            Self::Singular { what, index } => write!(
                f,
                "{what}: pivot {index} is below the small-pivot guard (the matrix is singular or \
                 nearly so)"
            ),
            Self::TooLarge { what, limit, unit } => write!(
                f,
                "`{what}` needs more than {limit} {unit}, the most this platform or device allows"
            ),
            Self::Overflow { what } => write!(
                f,
                "`{what}` overflows its element type although the input is finite; scale the \
                 input down"
            ),
            Self::OutOfMemory { what, bytes } => write!(
                f,
                "allocating {bytes} bytes for `{what}` failed: not enough memory"
            ),
            Self::DeviceFailure { reason } => write!(f, "the device failed: {reason}"),
            Self::PassOrder { what, expected } => {
                write!(f, "`{what}` was called out of order: {expected}")
            }
        }
    }
}

impl core::error::Error for Error {}

/// Shorthand for results of the family.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Checks `found == expected` for a slice length.
pub(crate) fn check_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            found,
        })
    }
}

/// Checks `value` is finite and satisfies `ok`.
pub(crate) fn check_param(
    name: &'static str,
    value: f64,
    expected: &'static str,
    ok: bool,
) -> Result<()> {
    if ok && !value.is_nan() {
        Ok(())
    } else {
        Err(Error::InvalidParam {
            name,
            value,
            expected,
        })
    }
}

/// Rejects the first non-finite element of `values`.
#[cfg(feature = "alloc")]
pub(crate) fn check_finite<T: crate::Element>(what: &'static str, values: &[T]) -> Result<()> {
    match values.iter().position(|v| !v.to_f32().is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite { what, index }),
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn messages_name_the_operand_and_both_values() {
        let shape = Error::ShapeMismatch {
            what: "w_up",
            expected: [1536, 576],
            found: [576, 1536],
        };
        assert_eq!(
            shape.to_string(),
            "`w_up` has shape 576x1536 but this op needs 1536x576"
        );
        let param = Error::InvalidParam {
            name: "density",
            value: 1.5,
            expected: "in (0, 1]",
        };
        assert_eq!(
            param.to_string(),
            "parameter `density` = 1.5 is invalid: it must be in (0, 1]"
        );
        let format = Error::BadFormat {
            offset: 12,
            reason: "more non-zeros than elements",
        };
        assert!(format.to_string().contains("byte 12"));
        let nan = Error::NonFinite {
            what: "tau",
            index: 7,
        };
        assert!(nan.to_string().contains("`tau`") && nan.to_string().contains("index 7"));
        let boxed: alloc::boxed::Box<dyn core::error::Error> = alloc::boxed::Box::new(shape);
        assert!(boxed.to_string().contains("w_up"));
    }
}
