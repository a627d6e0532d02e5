//! Every GEMV kernel, on every ISA, element type and thread count, against the reference (the
//! shared bodies in `kernels_testkit::gemv`).

use half::bf16;
use kernels_cpu::gemv::gemv_tolerance;
use kernels_cpu::prelude::*;
use kernels_testkit::gemv::{
    GemvBackend, bad_inputs, check_gemv, check_sparse, edge_shapes, real_model_sizes,
    special_values, transposed_dense,
};
use kernels_testkit::isa_tests;
use proptest::prelude::*;

/// The CPU backend, for the shared bodies.
struct OnCpu(Cpu);

impl<T: Element> GemvBackend<T> for OnCpu {
    fn name(&self) -> String {
        format!("{:?}", self.0)
    }

    fn gemv(&self, w: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
        gemv(&self.0, w, x, y)
    }

    fn gathered(&self, w: MatRef<'_, T>, x: &[f32], rows: &[u32], out: &mut [f32]) -> Result<()> {
        gathered_gemv(&self.0, w, x, rows, out)
    }

    fn sparse_input(
        &self,
        w_t: MatRef<'_, T>,
        x: &[f32],
        threshold: f32,
        y: &mut [f32],
    ) -> Result<()> {
        sparse_input_gemv(&self.0, w_t, x, threshold, y)
    }

    fn gemv_t(&self, w_t: MatRef<'_, T>, x: &[f32], y: &mut [f32]) -> Result<()> {
        gemv_t(&self.0, w_t, x, y)
    }

    fn tolerance(&self, n: usize, abs_sum: f64) -> f64 {
        gemv_tolerance(n, abs_sum)
    }

    /// The thread split never changes a bit.
    fn alternate(&self) -> Option<Self> {
        Some(Self(self.0.with_threads(1).unwrap()))
    }
}

fn edge(cpu: &Cpu) {
    edge_shapes(&OnCpu(*cpu));
}

fn real_sizes(cpu: &Cpu) {
    real_model_sizes(&OnCpu(*cpu));
}

fn transposed(cpu: &Cpu) {
    transposed_dense(&OnCpu(*cpu));
}

fn specials(cpu: &Cpu) {
    special_values(&OnCpu(*cpu));
}

fn bad(cpu: &Cpu) {
    bad_inputs(&OnCpu(*cpu));
}

isa_tests!(edge, real_sizes, transposed, specials, bad);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_shapes_on_the_best_isa(rows in 0usize..200, cols in 0usize..200, t in -0.5f32..2.0, seed in any::<u64>()) {
        let cpu = OnCpu(Cpu::detect().with_threads(2).unwrap());
        check_gemv::<bf16, OnCpu>(&cpu, rows, cols, seed);
        check_sparse::<f32, OnCpu>(&cpu, rows, cols, t, seed);
    }
}
