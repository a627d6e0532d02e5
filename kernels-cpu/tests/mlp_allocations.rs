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

/// Tests take turns: the count is global. It counts the test harness's thread too, which
/// allocates when it warns that a test has run for 60 s (its clock includes the wait for this
/// lock): the whole file must stay well under that on a slow runner, such as the NEON tests
/// under qemu-user, so each loop is as short as still shows a per-split allocation (a token
/// splits 14 times here).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Allocations made while `f` runs.
fn allocations_of(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    f();
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

/// A SmolLM2-sized layer, its TEAL layout and four tokens.
struct Fixture {
    layer: Layer<f32>,
    gate_t: Vec<f32>,
    up_t: Vec<f32>,
    tokens: Vec<f32>,
}

const INTER: usize = 1536;
const HIDDEN: usize = 576;

impl Fixture {
    fn new(seed: u64) -> Self {
        let layer = Layer::<f32>::new(INTER, HIDDEN, seed);
        Self {
            gate_t: layer.transposed(&layer.gate),
            up_t: layer.transposed(&layer.up),
            tokens: normal::<f32>(4 * HIDDEN, seed + 8),
            layer,
        }
    }

    /// One decode step: a dense GEMV (an attention projection), the CATS MLP and the TEAL
    /// MLP.
    fn step(&self, cpu: &Cpu, batch: usize, scratch: &mut MlpScratch, out: &mut [f32]) {
        let teal_weights = TealMlpWeights {
            gate_t: MatRef::from_slice(&self.gate_t, HIDDEN, INTER).unwrap(),
            up_t: MatRef::from_slice(&self.up_t, HIDDEN, INTER).unwrap(),
            down_t: MatRef::from_slice(&self.layer.down_t, INTER, HIDDEN).unwrap(),
        };
        let x = MatRef::from_slice(&self.tokens[..batch * HIDDEN], batch, HIDDEN).unwrap();
        let projection =
            MatRef::from_slice(&self.layer.gate[..HIDDEN * HIDDEN], HIDDEN, HIDDEN).unwrap();
        gemv(cpu, projection, x.row(0), &mut out[..HIDDEN]).unwrap();
        let y = MatMut::from_slice(&mut out[..batch * HIDDEN], batch, HIDDEN).unwrap();
        cats_mlp(cpu, x, self.layer.cats(), 0.3, y, scratch).unwrap();
        let y = MatMut::from_slice(&mut out[..batch * HIDDEN], batch, HIDDEN).unwrap();
        let thresholds = TealThresholds::new(0.5, 0.05);
        teal_mlp(cpu, x, teal_weights, thresholds, y, scratch).unwrap();
    }

    /// Allocations of `steps` decode steps after `warm_up` others.
    fn allocations(&self, cpu: &Cpu, batch: usize, warm_up: usize, steps: usize) -> usize {
        let mut scratch = MlpScratch::new();
        let mut out = vec![0.0f32; 4 * HIDDEN];
        for _ in 0..warm_up {
            self.step(cpu, batch, &mut scratch, &mut out);
        }
        allocations_of(|| {
            for _ in 0..steps {
                self.step(cpu, batch, &mut scratch, &mut out);
            }
        })
    }
}

#[test]
fn a_decode_loop_allocates_nothing_after_its_first_token() {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fixture = Fixture::new(3);
    for cpu in Cpu::all_available() {
        for batch in 1..=4 {
            let later = fixture.allocations(&cpu, batch, 1, 10);
            assert_eq!(later, 0, "{cpu:?} batch {batch}: allocations per token");
        }
    }
}

#[test]
fn a_threaded_decode_loop_allocates_nothing_to_split_its_work() {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fixture = Fixture::new(4);
    // Split even these small matrices, on a pool this test owns (its threads start up front).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let cpu = Cpu::detect()
        .with_threads(2)
        .unwrap()
        .with_min_bytes_per_thread(1);
    let later = pool.install(|| fixture.allocations(&cpu, 3, 5, 50));
    assert_eq!(later, 0, "allocations per token on two threads");
}

#[test]
fn the_spinning_team_allocates_nothing_to_split_its_work() {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fixture = Fixture::new(5);
    for threads in [2, 3] {
        let cpu = Cpu::detect()
            .with_threads(threads)
            .unwrap()
            .with_spinning_team()
            .with_min_bytes_per_thread(1);
        // The first steps start the team's threads.
        let later = fixture.allocations(&cpu, 2, 5, 50);
        assert_eq!(later, 0, "allocations per token on a team of {threads}");
    }
}
