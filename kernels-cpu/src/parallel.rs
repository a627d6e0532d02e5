//! Splitting work over threads. Every split is of *outputs*, so results never depend on it.

#[cfg(feature = "alloc")]
use core::ops::Range;

/// Splits `0..len` into at most `parts` contiguous ranges whose boundaries are multiples of
/// `align` (the last range takes the remainder), dropping empty ones.
#[cfg(feature = "alloc")]
pub(crate) fn ranges(len: usize, parts: usize, align: usize) -> impl Iterator<Item = Range<usize>> {
    let align = align.max(1);
    let per_part = len.div_ceil(parts.max(1)).div_ceil(align) * align;
    let step = per_part.max(align);
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// How many parts to split `work` units into: at most `threads`, and no part smaller than
/// `min_per_part` (waking a thread costs microseconds; tiny parts would lose to one thread).
/// Without `alloc` there is no pool and no way to hold the parts: always one.
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
/// of `align` (`bytes_per_element` of work each decides how many parts pay off). Without
/// `alloc`, one part.
pub(crate) fn split_outputs<X: Send>(
    cpu: &crate::Cpu,
    out: &mut [X],
    bytes_per_element: usize,
    align: usize,
    run: impl Fn(core::ops::Range<usize>, &mut [X]) + Sync,
) {
    let parts = parts_for(
        cpu.threads(),
        out.len() * bytes_per_element,
        cpu.min_bytes_per_thread(),
    );
    if parts <= 1 {
        let all = 0..out.len();
        run(all, out);
        return;
    }
    #[cfg(not(feature = "alloc"))]
    let _ = align;
    #[cfg(feature = "alloc")]
    {
        let mut work = alloc::vec::Vec::with_capacity(parts);
        let mut rest = out;
        for range in ranges(rest.len(), parts, align) {
            let (part, tail) = rest.split_at_mut(range.len());
            work.push((range, part));
            rest = tail;
        }
        for_each(work, |(range, part)| run(range, part));
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
}
