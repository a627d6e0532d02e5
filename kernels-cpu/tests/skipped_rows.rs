//! Proof that skipped rows are never read: their pages are made inaccessible (`PROT_NONE`), so any
//! load from them kills the test with SIGSEGV. Every ISA and thread count runs it.
#![cfg(target_os = "linux")]

use kernels_core::ops::sparse::{count_active, is_active, sparse_input_gemv_ref};
use kernels_cpu::prelude::*;
use kernels_testkit::isa_tests;

/// A `rows x cols` f32 matrix whose every row is one page, with chosen rows made unreadable.
struct GuardedMatrix {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
}

impl GuardedMatrix {
    fn page() -> usize {
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
    }

    fn new(rows: usize, values: impl Fn(usize, usize) -> f32) -> Self {
        let page = Self::page();
        let cols = page / 4;
        // SAFETY: an anonymous private mapping of rows * page bytes, checked below.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                rows * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let m = Self {
            ptr: ptr.cast(),
            rows,
            cols,
        };
        // SAFETY: the mapping holds rows * cols f32 and is writable.
        let data = unsafe { std::slice::from_raw_parts_mut(m.ptr, rows * cols) };
        for (k, v) in data.iter_mut().enumerate() {
            *v = values(k / cols, k % cols);
        }
        m
    }

    fn forbid(&self, row: usize) {
        let page = Self::page();
        // SAFETY: the page lies inside our mapping.
        let rc = unsafe {
            libc::mprotect(
                self.ptr.cast::<u8>().add(row * page).cast(),
                page,
                libc::PROT_NONE,
            )
        };
        assert_eq!(rc, 0);
    }

    fn allow_all(&self) {
        // SAFETY: the whole mapping is ours.
        let rc = unsafe {
            libc::mprotect(
                self.ptr.cast(),
                self.rows * Self::page(),
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        assert_eq!(rc, 0);
    }

    fn view(&self) -> MatRef<'_, f32> {
        // SAFETY: rows * cols f32 live as long as self; forbidden pages are never touched by a
        // correct kernel, which is what this test checks.
        let data = unsafe { std::slice::from_raw_parts(self.ptr, self.rows * self.cols) };
        MatRef::from_slice(data, self.rows, self.cols).expect("shape")
    }
}

impl Drop for GuardedMatrix {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.rows * Self::page()) };
    }
}

fn value(i: usize, j: usize) -> f32 {
    ((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5
}

fn sparse_gemv_reads_only_active_rows(cpu: &Cpu) {
    let rows = 40;
    let w_t = GuardedMatrix::new(rows, value);
    let x: Vec<f32> = (0..rows)
        .map(|i| if i % 3 == 0 { 1.0 + i as f32 } else { 0.01 })
        .collect();
    let mut expect = vec![0.0; w_t.cols];
    sparse_input_gemv_ref(w_t.view(), &x, 0.5, &mut expect).unwrap();
    for i in (0..rows).filter(|&i| !is_active(x[i], 0.5)) {
        w_t.forbid(i);
    }
    let mut y = vec![0.0; w_t.cols];
    sparse_input_gemv(cpu, w_t.view(), &x, 0.5, &mut y).unwrap();
    w_t.allow_all();
    assert_eq!(
        count_active(&x, 0.5),
        (0..rows).filter(|i| i % 3 == 0).count()
    );
    for (a, b) in y.iter().zip(&expect) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()));
    }
}

fn cats_mlp_reads_only_active_up_and_down_rows(cpu: &Cpu) {
    let inter = 24;
    let gate = GuardedMatrix::new(inter, value);
    let up = GuardedMatrix::new(inter, |i, j| value(j, i));
    let down_t = GuardedMatrix::new(inter, |i, j| value(i + 1, j));
    let hidden = gate.cols;
    // x picks out one column: gate row i gives g_i = value(i, 0) * 4, some active, some not.
    let mut x = vec![0.0f32; hidden];
    x[0] = 4.0;
    let weights = CatsMlpWeights {
        gate: gate.view(),
        up: up.view(),
        down_t: down_t.view(),
    };
    let mut y = vec![0.0; hidden];
    // A first run with everything readable tells which rows are active.
    let xm = MatRef::from_slice(&x, 1, hidden).unwrap();
    let scratch = &mut MlpScratch::new();
    cats_mlp(
        cpu,
        xm,
        weights,
        0.5,
        MatMut::from_slice(&mut y, 1, hidden).unwrap(),
        scratch,
    )
    .unwrap();
    let open = scratch.report().clone();
    assert!(
        !open.active.is_empty() && open.active.len() < inter,
        "a mix of active and skipped rows"
    );
    for i in (0..inter as u32).filter(|i| !open.active.contains(i)) {
        up.forbid(i as usize);
        down_t.forbid(i as usize);
    }
    cats_mlp(
        cpu,
        xm,
        weights,
        0.5,
        MatMut::from_slice(&mut y, 1, hidden).unwrap(),
        scratch,
    )
    .unwrap();
    up.allow_all();
    down_t.allow_all();
    assert_eq!(scratch.report(), &open);
}

fn teal_mlp_reads_only_active_rows(cpu: &Cpu) {
    // gate_t and up_t are [hidden, inter] with one page per hidden row.
    let hidden = 20;
    let gate_t = GuardedMatrix::new(hidden, value);
    let up_t = GuardedMatrix::new(hidden, |i, j| value(j, i + 2));
    let inter = gate_t.cols;
    // down_t is [inter, hidden]: its rows are short, so guard it through a matrix of page rows
    // restricted to `hidden` columns.
    let down_pages = GuardedMatrix::new(inter, |i, j| value(i, j + 1));
    // SAFETY: a strided view over the guarded mapping; rows start one page apart.
    let down_data = unsafe { std::slice::from_raw_parts(down_pages.ptr, inter * down_pages.cols) };
    let down_t = MatRef::new(down_data, inter, hidden, down_pages.cols).unwrap();
    let x: Vec<f32> = (0..hidden)
        .map(|i| if i % 4 == 1 { 2.0 } else { 0.05 })
        .collect();
    let weights = TealMlpWeights {
        gate_t: gate_t.view(),
        up_t: up_t.view(),
        down_t,
    };
    let xm = MatRef::from_slice(&x, 1, hidden).unwrap();
    let mut y = vec![0.0; hidden];
    let scratch = &mut MlpScratch::new();
    // The first down threshold that keeps some rows of h and skips others.
    let (thresholds, open) = [0.01f32, 0.03, 0.1, 0.3, 1.0, 3.0]
        .into_iter()
        .map(|t| {
            let thresholds = TealThresholds::new(0.5, t);
            teal_mlp(
                cpu,
                xm,
                weights,
                thresholds,
                MatMut::from_slice(&mut y, 1, hidden).unwrap(),
                scratch,
            )
            .unwrap();
            (thresholds, scratch.report().clone())
        })
        .find(|(_, report)| !report.active.is_empty() && report.active.len() < inter)
        .expect("a mix of active and skipped rows");
    for i in (0..hidden).filter(|&i| !is_active(x[i], 0.5)) {
        gate_t.forbid(i);
        up_t.forbid(i);
    }
    for i in (0..inter as u32).filter(|i| !open.active.contains(i)) {
        down_pages.forbid(i as usize);
    }
    teal_mlp(
        cpu,
        xm,
        weights,
        thresholds,
        MatMut::from_slice(&mut y, 1, hidden).unwrap(),
        scratch,
    )
    .unwrap();
    gate_t.allow_all();
    up_t.allow_all();
    down_pages.allow_all();
    assert_eq!(scratch.report(), &open);
}

isa_tests!(
    sparse_gemv_reads_only_active_rows,
    cats_mlp_reads_only_active_up_and_down_rows,
    teal_mlp_reads_only_active_rows
);
