//! One module per op family: parameters, validation and the scalar reference.

pub mod attention;
pub mod interpolate;
#[cfg(feature = "alloc")]
pub mod lowrank;
pub mod merge;
#[cfg(feature = "alloc")]
pub mod project;
pub mod select;
pub mod sparse;
pub mod ternary;
