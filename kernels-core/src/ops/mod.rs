//! One module per op family: parameters, validation and the scalar reference.

pub mod merge;
pub mod select;
pub mod sparse;
pub mod ternary;
