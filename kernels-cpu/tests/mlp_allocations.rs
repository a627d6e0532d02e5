//! A decode loop reuses its `MlpScratch`: after the first token, the MLPs (and the GEMVs around
//! them) allocate nothing. Counted by a global allocator, on every ISA and batch size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kernels_cpu::prelude::*;
use kernels_testkit::mlp::Layer;
use kernels_testkit::normal;

/// The system allocator, counting every allocation and reallocation.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tests take turns: the count is global.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Allocations made while `f` runs.
fn allocations_of(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    f();
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

/// One decode step: a dense GEMV (an attention projection), the CATS MLP and the TEAL MLP.
fn decode_step(
    cpu: &Cpu,
    layer: &Layer<f32>,
    teal_weights: TealMlpWeights<MatRef<'_, f32>>,
    tokens: &[f32],
    batch: usize,
    scratch: &mut MlpScratch,
    out: &mut [f32],
) {
    let hidden = layer.hidden;
    let x = MatRef::from_slice(&tokens[..batch * hidden], batch, hidden).unwrap();
    let projection = MatRef::from_slice(&layer.gate[..hidden * hidden], hidden, hidden).unwrap();
    gemv(cpu, projection, x.row(0), &mut out[..hidden]).unwrap();
    let y = MatMut::from_slice(&mut out[..batch * hidden], batch, hidden).unwrap();
    cats_mlp(cpu, x, layer.cats(), 0.3, y, scratch).unwrap();
    let y = MatMut::from_slice(&mut out[..batch * hidden], batch, hidden).unwrap();
    let thresholds = TealThresholds::new(0.5, 0.05);
    teal_mlp(cpu, x, teal_weights, thresholds, y, scratch).unwrap();
}

#[test]
fn a_decode_loop_allocates_nothing_after_its_first_token() {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (inter, hidden) = (1536, 576);
    let layer = Layer::<f32>::new(inter, hidden, 3);
    let (gate_t, up_t) = (layer.transposed(&layer.gate), layer.transposed(&layer.up));
    let teal_weights = TealMlpWeights {
        gate_t: MatRef::from_slice(&gate_t, hidden, inter).unwrap(),
        up_t: MatRef::from_slice(&up_t, hidden, inter).unwrap(),
        down_t: MatRef::from_slice(&layer.down_t, inter, hidden).unwrap(),
    };
    let tokens = normal::<f32>(4 * hidden, 11);
    let mut out = vec![0.0f32; 4 * hidden];
    for cpu in Cpu::all_available() {
        for batch in 1..=4 {
            let mut scratch = MlpScratch::new();
            let mut step = |scratch: &mut MlpScratch| {
                decode_step(
                    &cpu,
                    &layer,
                    teal_weights,
                    &tokens,
                    batch,
                    scratch,
                    &mut out,
                );
            };
            step(&mut scratch);
            let later = allocations_of(|| {
                for _ in 0..10 {
                    step(&mut scratch);
                }
            });
            assert_eq!(later, 0, "{cpu:?} batch {batch}: allocations per token");
        }
    }
}

#[test]
fn a_threaded_decode_loop_allocates_nothing_to_split_its_work() {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (inter, hidden) = (1536, 576);
    let layer = Layer::<f32>::new(inter, hidden, 4);
    let (gate_t, up_t) = (layer.transposed(&layer.gate), layer.transposed(&layer.up));
    let teal_weights = TealMlpWeights {
        gate_t: MatRef::from_slice(&gate_t, hidden, inter).unwrap(),
        up_t: MatRef::from_slice(&up_t, hidden, inter).unwrap(),
        down_t: MatRef::from_slice(&layer.down_t, inter, hidden).unwrap(),
    };
    let tokens = normal::<f32>(4 * hidden, 12);
    let mut out = vec![0.0f32; 4 * hidden];
    // Split even these small matrices, on a pool this test owns (its threads start up front).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let cpu = Cpu::detect()
        .with_threads(2)
        .unwrap()
        .with_min_bytes_per_thread(1);
    pool.install(|| {
        let mut scratch = MlpScratch::new();
        let mut step = |scratch: &mut MlpScratch| {
            decode_step(&cpu, &layer, teal_weights, &tokens, 3, scratch, &mut out);
        };
        for _ in 0..20 {
            step(&mut scratch);
        }
        let later = allocations_of(|| {
            for _ in 0..200 {
                step(&mut scratch);
            }
        });
        assert_eq!(later, 0, "allocations per token on two threads");
    });
}
