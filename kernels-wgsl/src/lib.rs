//! The WGSL sources of the `kernels` family, one file per kernel family, and the variants a GPU
//! backend selects from the adapter's features. `kernels-wgpu` builds its pipelines from them;
//! a user who wants the kernels on a GPU wants that crate.
//!
//! ```
//! use kernels_wgsl::{Family, ModuleSpec, Target};
//! let spec = ModuleSpec::portable(Family::Gemv, Target::Browser);
//! let wgsl = spec.source();
//! assert!(wgsl.contains("fn column_sweep"));
//! assert_eq!(spec.label(), "gemv");
//! ```
//!
//! Every kernel family is a `&'static str` (`GEMV`, `MERGE`, ...). Sizes (workgroup size, tile
//! shapes) and the element encoding are WGSL override constants, set when a pipeline is built;
//! nothing is templated. What differs between variants is which fixed parts a module is made of
//! and which `enable` directives it starts with, chosen by [`ModuleSpec`]:
//!
//! * **weights**: the portable variant binds weights as `array<u32>` and widens f16 and bf16
//!   exactly with integer operations ([`ELEMENTS`]; not `unpack2x16float`, which GL ES lacks and
//!   which may flush subnormals); the `shader-f16` variant binds f16 weights as `array<f16>`.
//! * **subgroups**: families with a subgroup kernel add it only where the adapter offers
//!   subgroups; the portable kernels need neither feature.
//! * **target**: WGSL for browsers must say `enable subgroups;` before using subgroup built-ins,
//!   while naga (wgpu on native) rejects that directive. [`Target`] says which to emit.
//!
//! `#![no_std]`: the crate is a set of string constants plus the code that joins them, which
//! needs `alloc`.
//!
//! # Cargo features
//!
//! None.

#![no_std]
#![warn(missing_docs)]

extern crate alloc;

use alloc::string::String;

/// Element encodings and helpers every family uses (`widen`, `word_of`, `linear_index`).
pub const ELEMENTS: &str = include_str!("wgsl/elements.wgsl");
/// Weights bound as packed words, the encoding set by the `ELEMENT` override (portable).
pub const WEIGHTS_PACKED: &str = include_str!("wgsl/weights_packed.wgsl");
/// f16 weights bound as `array<f16>` (needs `shader-f16`).
pub const WEIGHTS_F16: &str = include_str!("wgsl/weights_f16.wgsl");
/// Dense, gathered and sparse-input GEMV, and the MLP steps built on them.
pub const GEMV: &str = include_str!("wgsl/gemv.wgsl");
/// The subgroup (ballot) variant of the sparse-input sweep; joined after [`GEMV`].
pub const GEMV_SUBGROUP: &str = include_str!("wgsl/gemv_subgroup.wgsl");
/// Merge reductions: linear combinations, Fisher merging and accumulation, TIES election.
pub const MERGE: &str = include_str!("wgsl/merge.wgsl");
/// DARE with the shared counter-based generator (Philox4x32-10).
pub const DARE: &str = include_str!("wgsl/dare.wgsl");
/// Magnitude radix select: histograms, tie counts and cut application (top-k, TIES trim,
/// Breadcrumbs).
pub const SELECT: &str = include_str!("wgsl/select.wgsl");
/// Ternary compression: ComPEFT's moments, and GEMV, decode and decompress-add straight from
/// 2-bit codes.
pub const TERNARY: &str = include_str!("wgsl/ternary.wgsl");
/// Linear algebra: the tiled GEMM and its split-K reduction, OPCM's mask, and Householder QR of
/// the rows of a matrix.
pub const LINALG: &str = include_str!("wgsl/linalg.wgsl");

/// Values of the `ELEMENT` override constant: how a packed tensor encodes its elements.
pub mod element {
    /// `f32`, one per word.
    pub const F32: u32 = 0;
    /// IEEE binary16, two per word.
    pub const F16: u32 = 1;
    /// bfloat16, two per word.
    pub const BF16: u32 = 2;
}

/// Where the WGSL will be compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// wgpu on Vulkan, Metal, DX12 or GL: naga compiles it, and rejects `enable subgroups;`.
    Native,
    /// A browser's WebGPU: `enable subgroups;` must precede subgroup built-ins.
    Browser,
}

/// A kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// [`GEMV`]: entry points `row_dot`, `column_sweep`, `sum_splits`, `cats_up`,
    /// `silu_product`, and with subgroups `column_sweep_ballot`.
    Gemv,
    /// [`MERGE`]: `linear_pass`, `fisher_pass`, `fisher_finish`, `ties_pass`, `ties_finish`,
    /// `fisher_accumulate`, `gram_tiles`.
    Merge,
    /// [`DARE`]: `dare_l1_sums`, `dare`.
    Dare,
    /// [`SELECT`]: `histogram`, `count_equal`, `apply_cuts`.
    Select,
    /// [`TERNARY`]: `ternary_gemv`, `ternary_decode`, `ternary_add`, `tile_moments`,
    /// `ternary_add_packed`.
    Ternary,
    /// [`LINALG`]: `gemm_tile`, `gemm_reduce`, `mask_block`, `identity_rows`, `transpose`,
    /// `house_vector`, `house_apply`.
    Linalg,
}

impl Family {
    /// Every family (a slice: the list may grow).
    pub const ALL: &'static [Self] = &[
        Self::Gemv,
        Self::Merge,
        Self::Dare,
        Self::Select,
        Self::Ternary,
        Self::Linalg,
    ];

    /// Whether the family has an `array<f16>` weights variant.
    ///
    /// ```
    /// # use kernels_wgsl::Family;
    /// assert!(Family::Gemv.has_f16_variant() && !Family::Merge.has_f16_variant());
    /// ```
    #[must_use]
    pub const fn has_f16_variant(self) -> bool {
        matches!(self, Self::Gemv | Self::Linalg)
    }

    /// Whether the family has subgroup kernels.
    ///
    /// ```
    /// # use kernels_wgsl::Family;
    /// assert!(Family::Gemv.has_subgroup_variant() && !Family::Select.has_subgroup_variant());
    /// ```
    #[must_use]
    pub const fn has_subgroup_variant(self) -> bool {
        matches!(self, Self::Gemv)
    }
}

/// One shader module: a family and the variant the adapter's features select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModuleSpec {
    /// The kernel family.
    pub family: Family,
    /// Bind f16 weights as `array<f16>` (needs `shader-f16`; only families that have the variant).
    pub native_f16: bool,
    /// Include the subgroup kernels (needs subgroups; only families that have them).
    pub subgroups: bool,
    /// Where the module will be compiled.
    pub target: Target,
}

impl ModuleSpec {
    /// The portable module of `family` for `target`: neither `shader-f16` nor subgroups.
    ///
    /// ```
    /// # use kernels_wgsl::{Family, ModuleSpec, Target};
    /// let spec = ModuleSpec::portable(Family::Select, Target::Native);
    /// assert!(!spec.native_f16 && !spec.subgroups);
    /// ```
    #[must_use]
    pub const fn portable(family: Family, target: Target) -> Self {
        Self {
            family,
            native_f16: false,
            subgroups: false,
            target,
        }
    }

    /// Every variant of every family for `target`.
    ///
    /// ```
    /// # use kernels_wgsl::{ModuleSpec, Target};
    /// // Four variants of GEMV (f16 and subgroups, each on or off), two of linear algebra (f16 on
    /// // or off), one of each other family.
    /// assert_eq!(ModuleSpec::all(Target::Native).count(), 10);
    /// ```
    pub fn all(target: Target) -> impl Iterator<Item = Self> {
        Family::ALL.iter().flat_map(move |&family| {
            [(false, false), (true, false), (false, true), (true, true)]
                .into_iter()
                .filter(move |&(f16, subgroups)| {
                    (!f16 || family.has_f16_variant())
                        && (!subgroups || family.has_subgroup_variant())
                })
                .map(move |(native_f16, subgroups)| Self {
                    family,
                    native_f16,
                    subgroups,
                    target,
                })
        })
    }

    /// A label naming the module and its variant, e.g. `"gemv+f16+subgroups"`.
    ///
    /// ```
    /// # use kernels_wgsl::{Family, ModuleSpec, Target};
    /// let spec = ModuleSpec { native_f16: true, ..ModuleSpec::portable(Family::Gemv, Target::Native) };
    /// assert_eq!(spec.label(), "gemv+f16");
    /// ```
    #[must_use]
    pub fn label(&self) -> String {
        let mut label = String::from(match self.family {
            Family::Gemv => "gemv",
            Family::Merge => "merge",
            Family::Dare => "dare",
            Family::Select => "select",
            Family::Ternary => "ternary",
            Family::Linalg => "linalg",
        });
        if self.native_f16 {
            label.push_str("+f16");
        }
        if self.subgroups {
            label.push_str("+subgroups");
        }
        label
    }

    /// The module's WGSL: directives, then [`ELEMENTS`], then the family's parts.
    ///
    /// ```
    /// # use kernels_wgsl::{Family, ModuleSpec, Target};
    /// let browser = ModuleSpec { subgroups: true, ..ModuleSpec::portable(Family::Gemv, Target::Browser) };
    /// assert!(browser.source().starts_with("enable subgroups;"));
    /// let native = ModuleSpec { target: Target::Native, ..browser };
    /// assert!(!native.source().contains("enable subgroups;"));
    /// ```
    #[must_use]
    pub fn source(&self) -> String {
        let native_f16 = self.native_f16 && self.family.has_f16_variant();
        let subgroups = self.subgroups && self.family.has_subgroup_variant();
        let mut source = String::new();
        if native_f16 {
            source.push_str("enable f16;\n");
        }
        if subgroups && self.target == Target::Browser {
            source.push_str("enable subgroups;\n");
        }
        source.push_str(ELEMENTS);
        match self.family {
            Family::Gemv => {
                source.push_str(if native_f16 {
                    WEIGHTS_F16
                } else {
                    WEIGHTS_PACKED
                });
                source.push_str(GEMV);
                if subgroups {
                    source.push_str(GEMV_SUBGROUP);
                }
            }
            Family::Merge => source.push_str(MERGE),
            Family::Dare => source.push_str(DARE),
            Family::Select => source.push_str(SELECT),
            Family::Ternary => source.push_str(TERNARY),
            Family::Linalg => {
                source.push_str(if native_f16 {
                    WEIGHTS_F16
                } else {
                    WEIGHTS_PACKED
                });
                source.push_str(LINALG);
            }
        }
        source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use naga::valid::{Capabilities, ValidationFlags, Validator};

    fn validate(spec: ModuleSpec) -> Result<naga::Module, String> {
        let source = spec.source();
        let module = naga::front::wgsl::parse_str(&source)
            .map_err(|e| e.emit_to_string_with_path(&source, &spec.label()))?;
        let mut capabilities = Capabilities::empty();
        if spec.native_f16 {
            capabilities |= Capabilities::SHADER_FLOAT16;
        }
        if spec.subgroups {
            capabilities |= Capabilities::SUBGROUP;
        }
        Validator::new(ValidationFlags::all(), capabilities)
            .validate(&module)
            .map_err(|e| e.emit_to_string_with_path(&source, &spec.label()))?;
        Ok(module)
    }

    #[test]
    fn every_variant_parses_and_validates_with_naga() {
        let mut checked = 0;
        for spec in ModuleSpec::all(Target::Native) {
            if let Err(e) = validate(spec) {
                panic!("{}: {e}", spec.label());
            }
            checked += 1;
        }
        // gemv: 4 variants; linalg: 2; merge, dare, select and ternary: 1 each.
        assert_eq!(checked, 10);
    }

    #[test]
    fn each_variant_needs_exactly_its_features() {
        // Without the capability, naga must refuse the variant: the feature gate is real.
        for spec in ModuleSpec::all(Target::Native).filter(|s| s.native_f16 || s.subgroups) {
            let source = spec.source();
            let module = naga::front::wgsl::parse_str(&source).expect("parses");
            let mut without = Capabilities::all();
            if spec.native_f16 {
                without.remove(Capabilities::SHADER_FLOAT16);
            } else {
                without.remove(Capabilities::SUBGROUP);
            }
            assert!(
                Validator::new(ValidationFlags::all(), without)
                    .validate(&module)
                    .is_err(),
                "{} validated without its feature",
                spec.label()
            );
        }
        // The portable modules need no capability at all.
        for &family in Family::ALL {
            let spec = ModuleSpec::portable(family, Target::Native);
            let module = naga::front::wgsl::parse_str(&spec.source()).expect("parses");
            Validator::new(ValidationFlags::all(), Capabilities::empty())
                .validate(&module)
                .unwrap_or_else(|e| panic!("{}: {e}", spec.label()));
        }
    }

    #[test]
    fn entry_points_are_the_documented_ones() {
        let names = |spec: ModuleSpec| -> alloc::vec::Vec<String> {
            let module = validate(spec).expect("validates");
            module.entry_points.iter().map(|e| e.name.clone()).collect()
        };
        let gemv = ModuleSpec::portable(Family::Gemv, Target::Native);
        assert_eq!(
            names(gemv),
            [
                "row_dot",
                "column_sweep",
                "sum_splits",
                "cats_up",
                "silu_product"
            ]
        );
        let ballot = ModuleSpec {
            subgroups: true,
            ..gemv
        };
        assert!(names(ballot).iter().any(|n| n == "column_sweep_ballot"));
        assert_eq!(
            names(ModuleSpec::portable(Family::Merge, Target::Native)),
            [
                "linear_pass",
                "fisher_pass",
                "fisher_finish",
                "ties_pass",
                "ties_finish",
                "fisher_accumulate",
                "gram_tiles"
            ]
        );
        assert_eq!(
            names(ModuleSpec::portable(Family::Dare, Target::Native)),
            ["dare_l1_sums", "dare"]
        );
        assert_eq!(
            names(ModuleSpec::portable(Family::Select, Target::Native)),
            ["histogram", "count_equal", "apply_cuts"]
        );
        assert_eq!(
            names(ModuleSpec::portable(Family::Ternary, Target::Native)),
            [
                "ternary_gemv",
                "ternary_decode",
                "ternary_add",
                "tile_moments",
                "ternary_add_packed"
            ]
        );
        assert_eq!(
            names(ModuleSpec::portable(Family::Linalg, Target::Native)),
            [
                "gemm_tile",
                "gemm_reduce",
                "mask_block",
                "identity_rows",
                "transpose",
                "house_vector",
                "house_apply"
            ]
        );
    }

    #[test]
    fn directives_follow_the_target() {
        let spec = ModuleSpec {
            family: Family::Gemv,
            native_f16: true,
            subgroups: true,
            target: Target::Browser,
        };
        let browser = spec.source();
        assert!(browser.starts_with("enable f16;\nenable subgroups;\n"));
        // naga (the native compiler) rejects the browser's directive: the reason for `Target`.
        assert!(naga::front::wgsl::parse_str(&browser).is_err());
        let native = ModuleSpec {
            target: Target::Native,
            ..spec
        }
        .source();
        assert!(!native.contains("enable subgroups"));
        assert!(native.starts_with("enable f16;\n"));
        // Families without a subgroup kernel never ask for the feature.
        let merge = ModuleSpec {
            family: Family::Merge,
            ..spec
        };
        assert!(!merge.source().contains("enable"));
    }

    #[test]
    fn override_constants_exist_where_the_backend_sets_them() {
        for spec in ModuleSpec::all(Target::Native) {
            let module = validate(spec).expect("validates");
            let overrides: alloc::vec::Vec<&str> = module
                .overrides
                .iter()
                .filter_map(|(_, o)| o.name.as_deref())
                .collect();
            assert!(overrides.contains(&"WORKGROUP"), "{}", spec.label());
            assert_eq!(
                overrides.contains(&"ELEMENT"),
                !spec.native_f16,
                "{}",
                spec.label()
            );
        }
    }
}

/// The crate's README, whose examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
