//! Every GEMV kernel, on every ISA, element type and thread count, against the reference (the
//! shared bodies in `common::gemv`).

mod common;

use common::gemv::{
    GemvBackend, bad_inputs, check_gemv, check_sparse, edge_shapes, real_model_sizes,
    special_values, transposed_dense,
};
use half::bf16;
use kernels_core::{Element, MatRef, Result};
use kernels_cpu::Cpu;
use kernels_cpu::gemv::{gathered_gemv, gemv, gemv_t, gemv_tolerance, sparse_input_gemv};
use proptest::prelude::*;

impl<T: Element> GemvBackend<T> for Cpu {
    fn name(&self) -> String {
        format!("{self:?}")
    }

    fn gemv(&self, w: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
        gemv(self, w, x, y)
    }

    fn gathered(&self, w: MatRef<'_, T>, x: &[f32], rows: &[u32], out: &mut [f32]) -> Result<()> {
        gathered_gemv(self, w, x, rows, out)
    }

    fn sparse_input(
        &self,
        w_t: MatRef<'_, T>,
        x: &[f32],
        threshold: f32,
        y: &mut [f32],
    ) -> Result<Option<usize>> {
        sparse_input_gemv(self, w_t, x, threshold, y).map(Some)
    }

    fn gemv_t(&self, w_t: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
        gemv_t(self, w_t, x, y)
    }

    fn tolerance(&self, n: usize, abs_sum: f64) -> f64 {
        gemv_tolerance(n, abs_sum)
    }

    /// The thread split never changes a bit.
    fn alternate(&self) -> Option<Self> {
        Some(self.with_threads(1).unwrap())
    }
}

fn edge(cpu: &Cpu) {
    edge_shapes(cpu);
}

fn real_sizes(cpu: &Cpu) {
    real_model_sizes(cpu);
}

fn transposed(cpu: &Cpu) {
    transposed_dense(cpu);
}

fn specials(cpu: &Cpu) {
    special_values(cpu);
}

fn bad(cpu: &Cpu) {
    bad_inputs(cpu);
}

isa_tests!(edge, real_sizes, transposed, specials, bad);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_shapes_on_the_best_isa(rows in 0usize..200, cols in 0usize..200, t in -0.5f32..2.0, seed in any::<u64>()) {
        let cpu = Cpu::detect().with_threads(2).unwrap();
        check_gemv::<bf16, Cpu>(&cpu, rows, cols, seed);
        check_sparse::<f32, Cpu>(&cpu, rows, cols, t, seed);
    }
}
