//! A streamed selection allocates no more per chunk than the chunk justifies: its bracket's cap
//! is the whole model's, and each pass over a small chunk must not size buffers by it. Measured
//! by a global allocator that adds up the bytes asked for.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kernels_core::MultiPass;
use kernels_core::ops::select::topk_cut_ref;
use kernels_cpu::prelude::*;
use kernels_testkit::normal;

/// The system allocator, adding up the bytes asked for.
struct Counting;

static BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BYTES.fetch_add(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tests take turns: the count is global.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A model of 128 chunks of 8192 entries: the sampled bracket of the whole (1 Mi entries)
/// allows about 19 000 keys, where each chunk holds 8192 entries.
const CHUNKS: usize = 128;
const CHUNK: usize = 8192;

fn streamed_pass_allocates_by_the_chunk<T: Element>(cpu: &Cpu) {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let model: Vec<T> = normal(CHUNKS * CHUNK, 3);
    let chunks: Vec<&[T]> = model.chunks(CHUNK).collect();
    let keep = KeepRule::Density(0.1);
    let mut topk = StreamingTopK::new(keep).unwrap();
    let mut bytes_per_pass = Vec::new();
    loop {
        BYTES.store(0, Ordering::SeqCst);
        for chunk in &chunks {
            topk.feed(cpu, chunk).unwrap();
        }
        bytes_per_pass.push(BYTES.load(Ordering::SeqCst));
        if !topk.next_pass().unwrap() {
            break;
        }
    }
    assert_eq!(topk.finish().unwrap(), topk_cut_ref(&chunks, keep).unwrap());
    // Pass 2 collects the keys inside the bracket (about 1.4 % of the entries, 4 bytes each, in
    // a vector that doubles) and, per chunk, its parts' key buffers (at most a key per entry,
    // reserved and mostly never touched) and bookkeeping: less than two keys' worth per entry.
    // Buffers sized by the whole model's cap would ask for about 75 KiB per part and chunk, over
    // 100 MiB in all.
    let bound = model.len() * 8;
    assert_eq!(bytes_per_pass.len(), 2, "the sampled bracket holds");
    assert!(
        bytes_per_pass[1] <= bound,
        "{:?} {cpu:?}: pass 2 asked for {} bytes in all (bound {bound})",
        T::DTYPE,
        bytes_per_pass[1]
    );
}

fn streamed_f32(cpu: &Cpu) {
    streamed_pass_allocates_by_the_chunk::<f32>(cpu);
}
fn streamed_bf16(cpu: &Cpu) {
    streamed_pass_allocates_by_the_chunk::<half::bf16>(cpu);
}

kernels_testkit::isa_tests!(streamed_f32, streamed_bf16);
