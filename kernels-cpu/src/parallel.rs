//! Splitting work over threads. Every split is of *outputs*, so results never depend on it.

use core::ops::Range;

use crate::Cpu;

/// Splits `0..len` into at most `parts` contiguous ranges whose boundaries are multiples of
/// `align` (the last range takes the remainder), dropping empty ones.
#[cfg(feature = "alloc")]
pub(crate) fn ranges(len: usize, parts: usize, align: usize) -> impl Iterator<Item = Range<usize>> {
    let step = part_step(len, parts, align);
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// The length of each part of [`ranges`] (a multiple of `align`, at least `align`).
fn part_step(len: usize, parts: usize, align: usize) -> usize {
    let align = align.max(1);
    (len.div_ceil(parts.max(1)).div_ceil(align) * align).max(align)
}

/// How many parts to split `work` units into: at most `threads`, and no part smaller than
/// `min_per_part` (waking a thread costs microseconds; tiny parts would lose to one thread).
/// Without `alloc` there is no pool: always one.
pub(crate) fn parts_for(threads: usize, work: usize, min_per_part: usize) -> usize {
    if cfg!(feature = "alloc") {
        (work / min_per_part.max(1)).clamp(1, threads.max(1))
    } else {
        1
    }
}

/// Runs `f` on every item, on rayon's pool when there is more than one.
#[cfg(feature = "alloc")]
pub(crate) fn for_each<I: Send>(items: alloc::vec::Vec<I>, f: impl Fn(I) + Sync) {
    #[cfg(feature = "std")]
    if items.len() > 1 {
        let f = &f;
        rayon::scope(|scope| {
            let mut items = items.into_iter();
            let first = items.next();
            for item in items {
                scope.spawn(move |_| f(item));
            }
            if let Some(item) = first {
                f(item);
            }
        });
        return;
    }
    items.into_iter().for_each(f);
}

/// Runs `run(range, out_part)` over `out` split into at most `cpu.threads()` parts on multiples
/// of `align` (`bytes_per_element` of work each decides how many parts pay off).
pub(crate) fn split_outputs<X: Send>(
    cpu: &Cpu,
    out: &mut [X],
    bytes_per_element: usize,
    align: usize,
    run: impl Fn(Range<usize>, &mut [X]) + Sync,
) {
    let len = out.len();
    split_columns(
        cpu,
        [out],
        len,
        bytes_per_element,
        align,
        |range, [out]: [&mut [X]; 1]| run(range, out),
    );
}

/// [`split_outputs`] over the same columns `0..len` of `B` outputs at once (the rows of a batch;
/// an output shorter than `len` is split where it has columns): `run(range, parts)` gets each
/// output's part.
///
/// PERF: the parts are handed out by recursive `rayon::join`, which keeps its jobs on the stack:
/// a decode loop's GEMVs and MLPs allocate nothing to split (a scoped spawn boxes every job).
pub(crate) fn split_columns<X: Send, const B: usize>(
    cpu: &Cpu,
    outs: [&mut [X]; B],
    len: usize,
    bytes_per_column: usize,
    align: usize,
    run: impl Fn(Range<usize>, [&mut [X]; B]) + Sync,
) {
    let parts = parts_for(
        cpu.threads(),
        len.saturating_mul(bytes_per_column),
        cpu.min_bytes_per_thread(),
    );
    if len == 0 {
        return;
    }
    let step = part_step(len, parts, align);
    #[cfg(feature = "std")]
    if cpu.is_spinning() && len > step {
        let outs = outs.map(|out| SharedSlice(out.as_mut_ptr(), out.len()));
        let part = |p: usize| {
            let range = p * step..((p + 1) * step).min(len);
            // SAFETY: parts are disjoint ranges of each output, each handed to one thread, and
            // `run_parts` returns only once every part has finished.
            let parts = outs.map(|out| unsafe { out.range(range.clone()) });
            run(range, parts);
        };
        if crate::team::run_parts(len.div_ceil(step), &part) {
            return;
        }
        let outs = outs.map(|out| unsafe { out.range(0..out.1) });
        split_at_steps(outs, 0..len, step, &run);
        return;
    }
    split_at_steps(outs, 0..len, step, &run);
}

/// An output lent to the spinning team's parts: each takes a disjoint range.
#[cfg(feature = "std")]
struct SharedSlice<X>(*mut X, usize);

#[cfg(feature = "std")]
impl<X> Clone for SharedSlice<X> {
    fn clone(&self) -> Self {
        *self
    }
}
#[cfg(feature = "std")]
impl<X> Copy for SharedSlice<X> {}

// SAFETY: only disjoint ranges are made from it, each used by one thread ([`split_columns`]).
#[cfg(feature = "std")]
unsafe impl<X: Send> Sync for SharedSlice<X> {}
#[cfg(feature = "std")]
unsafe impl<X: Send> Send for SharedSlice<X> {}

#[cfg(feature = "std")]
impl<X> SharedSlice<X> {
    /// The part of `range` this output has (it may be shorter than `len`).
    ///
    /// # Safety
    ///
    /// No other live slice overlaps it.
    unsafe fn range<'a>(self, range: Range<usize>) -> &'a mut [X] {
        let start = range.start.min(self.1);
        let end = range.end.min(self.1);
        unsafe { core::slice::from_raw_parts_mut(self.0.add(start), end - start) }
    }
}

fn split_at_steps<X: Send, const B: usize>(
    outs: [&mut [X]; B],
    range: Range<usize>,
    step: usize,
    run: &(impl Fn(Range<usize>, [&mut [X]; B]) + Sync),
) {
    let len = range.len();
    if len <= step {
        run(range, outs);
        return;
    }
    let mid = len.div_ceil(step) / 2 * step;
    let mut rights: [&mut [X]; B] = core::array::from_fn(|_| <&mut [X]>::default());
    let mut slot = 0;
    let lefts = outs.map(|out| {
        let (left, right) = out.split_at_mut(mid.min(out.len()));
        rights[slot] = right;
        slot += 1;
        left
    });
    let (left, right) = (range.start..range.start + mid, range.start + mid..range.end);
    #[cfg(feature = "std")]
    rayon::join(
        || split_at_steps(lefts, left, step, run),
        || split_at_steps(rights, right, step, run),
    );
    #[cfg(not(feature = "std"))]
    {
        split_at_steps(lefts, left, step, run);
        split_at_steps(rights, right, step, run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn ranges_cover_everything_once_on_aligned_boundaries() {
        for len in [0, 1, 5, 63, 64, 65, 1000, 4096] {
            for parts in 1..5 {
                for align in [1, 4, 64] {
                    let rs: Vec<Range<usize>> = ranges(len, parts, align).collect();
                    assert!(rs.len() <= parts.max(1));
                    let mut next = 0;
                    for r in &rs {
                        assert_eq!(r.start, next);
                        assert!(r.start % align == 0 && r.end > r.start);
                        next = r.end;
                    }
                    assert_eq!(next, len);
                }
            }
        }
        assert_eq!(parts_for(8, 100, 30), 3);
        assert_eq!(parts_for(2, 10, 30), 1);
    }

    #[test]
    fn split_columns_hands_out_the_ranges_of_ranges() {
        for threads in 1..5 {
            let cpu = Cpu::detect()
                .with_threads(threads)
                .unwrap()
                .with_min_bytes_per_thread(1);
            for len in [0, 1, 5, 64, 65, 1000] {
                for align in [1, 4, 64] {
                    let mut a: Vec<usize> = alloc::vec![usize::MAX; len];
                    let mut b: Vec<usize> = alloc::vec![usize::MAX; len / 2];
                    let seen = std::sync::Mutex::new(Vec::new());
                    split_columns(
                        &cpu,
                        [&mut a[..], &mut b[..]],
                        len,
                        1,
                        align,
                        |r, [x, y]| {
                            assert_eq!(x.len(), r.len());
                            assert_eq!(y.len(), r.end.min(len / 2).saturating_sub(r.start));
                            for (i, v) in r.clone().zip(x.iter_mut()) {
                                *v = i;
                            }
                            for (i, v) in r.clone().zip(y.iter_mut()) {
                                *v = i;
                            }
                            seen.lock().unwrap().push(r);
                        },
                    );
                    assert!(a.iter().enumerate().all(|(i, &v)| v == i));
                    assert!(b.iter().enumerate().all(|(i, &v)| v == i));
                    let mut seen = seen.into_inner().unwrap();
                    seen.sort_by_key(|r| r.start);
                    let parts = parts_for(threads, len, 1);
                    let expect: Vec<Range<usize>> = ranges(len, parts, align).collect();
                    assert_eq!(seen, expect, "len {len} align {align} threads {threads}");
                }
            }
        }
    }
}
