//! A process-wide team of threads that spin between jobs, for [`crate::Cpu::with_spinning_team`].
//!
//! A decode loop calls a few hundred small kernels per token, microseconds apart. A parked rayon
//! worker takes 5 to 90 us to wake (measured; see BENCHMARKS.md), more than a SmolLM2-sized
//! GEMV's share of work; a worker that is still spinning on its mailbox starts in well under a
//! microsecond. Workers spin for [`SPIN`] after each job, then park until the next.
//!
//! No crate on crates.io offers a spin-then-park fork-join with borrowed jobs that is
//! maintained and small (rayon's workers park after a few yields and its `ThreadPoolBuilder`
//! has no spin setting), so this is ours: one mailbox per worker, a job pointer set by the
//! caller and cleared by the worker when done; the caller waits for every mailbox it filled
//! to clear before it returns, which is what makes lending a borrowed closure sound.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};
use std::vec::Vec;

/// How long a worker spins for its next job before it parks.
///
/// PERF: long enough to bridge the gaps between one token's kernels (attention, norms and the
/// sampling step take tens of microseconds), short enough that an idle team costs nothing
/// measurable.
const SPIN: Duration = Duration::from_micros(300);

/// How long a parked worker waits for a job before its thread ends (a later job starts a new
/// one). Under Miri, which wants every thread finished when a test ends, much less.
const RETIRE: Duration = if cfg!(miri) {
    Duration::from_millis(1)
} else {
    Duration::from_secs(10)
};

/// A job lent to workers: `call(data, part)` runs part `part`; `panicked` records a panic.
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
    panicked: AtomicBool,
}

/// A mailbox's job once its worker has ended (never the address of a real `Job`).
fn retired() -> *mut Job {
    core::ptr::dangling_mut()
}

struct Mailbox {
    /// The job to run, null when idle, or [`retired`].
    job: AtomicPtr<Job>,
    part: AtomicUsize,
    /// Whether the worker is parked (or about to be) and needs an unpark.
    parked: AtomicBool,
    thread: OnceLock<Thread>,
}

struct Team {
    /// Held while a job runs: one caller at a time (others, and nested calls, run elsewhere).
    busy: AtomicBool,
    workers: Mutex<Vec<Arc<Mailbox>>>,
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team {
        busy: AtomicBool::new(false),
        workers: Mutex::new(Vec::new()),
    })
}

/// A new worker with an empty mailbox, or `None` where threads cannot start (wasm32).
fn spawn_worker() -> Option<Arc<Mailbox>> {
    let mailbox = Arc::new(Mailbox {
        job: AtomicPtr::new(core::ptr::null_mut()),
        part: AtomicUsize::new(0),
        parked: AtomicBool::new(false),
        thread: OnceLock::new(),
    });
    let theirs = Arc::clone(&mailbox);
    let spawned = thread::Builder::new()
        .name("kernels-cpu-team".into())
        .spawn(move || work(&theirs))
        .ok()?;
    let _ = mailbox.thread.set(spawned.thread().clone());
    Some(mailbox)
}

/// Spins between reads of the clock while idle.
///
/// PERF: the clock read is a vDSO call; every iteration took 7 % of a decode's samples, and a
/// spinning hyperthread slows its sibling. `spin_loop` (`pause`) yields the core's resources.
const SPINS_PER_CLOCK_READ: u32 = 64;

fn work(mailbox: &Mailbox) {
    let mut idle_since = Instant::now();
    loop {
        let mut job = mailbox.job.load(Ordering::Acquire);
        for _ in 0..SPINS_PER_CLOCK_READ {
            if !job.is_null() {
                break;
            }
            core::hint::spin_loop();
            job = mailbox.job.load(Ordering::Acquire);
        }
        if job.is_null() {
            let idle = idle_since.elapsed();
            if idle < SPIN {
                continue;
            }
            if idle >= RETIRE
                && mailbox
                    .job
                    .compare_exchange(job, retired(), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return;
            }
            // Dekker with the caller's store-then-check: one of us sees the other.
            mailbox.parked.store(true, Ordering::SeqCst);
            if mailbox.job.load(Ordering::SeqCst).is_null() {
                thread::park_timeout(RETIRE);
            }
            mailbox.parked.store(false, Ordering::SeqCst);
            continue;
        }
        // SAFETY: the caller keeps `*job` alive until this mailbox is cleared below.
        let job_ref = unsafe { &*job };
        let part = mailbox.part.load(Ordering::Acquire);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            (job_ref.call)(job_ref.data, part);
        }));
        if run.is_err() {
            job_ref.panicked.store(true, Ordering::Relaxed);
        }
        mailbox.job.store(core::ptr::null_mut(), Ordering::Release);
        idle_since = Instant::now();
    }
}

/// Runs `f(0)`, ..., `f(parts - 1)` with `parts - 1` of them on the team and `f(0)` here;
/// returns `false` without running anything when the team is busy (another caller, or a call
/// from inside one of its own jobs) or cannot start its threads.
pub(crate) fn run_parts(parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    if parts <= 1 {
        f(0);
        return true;
    }
    let team = team();
    if team
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    let result = run_on_team(team, parts, f);
    team.busy.store(false, Ordering::Release);
    match result {
        Some(Ok(false)) => true,
        Some(Ok(true)) => panic!("a kernel panicked on a spinning-team thread"),
        Some(Err(payload)) => std::panic::resume_unwind(payload),
        None => false,
    }
}

/// Our own part's panic, else whether a worker's part panicked; `None` when the team could not
/// start the threads it needs (nothing has run then).
fn run_on_team(
    team: &Team,
    parts: usize,
    f: &(dyn Fn(usize) + Sync),
) -> Option<std::thread::Result<bool>> {
    unsafe fn call(data: *const (), part: usize) {
        // SAFETY: `data` is the `&&dyn Fn` below, alive until every mailbox clears.
        let f = unsafe { &*data.cast::<&(dyn Fn(usize) + Sync)>() };
        f(part);
    }
    let job = Job {
        data: core::ptr::from_ref(&f).cast(),
        call,
        panicked: AtomicBool::new(false),
    };
    let job_ptr = core::ptr::from_ref(&job).cast_mut();
    // Held for the whole job (the busy flag already keeps other callers out), so the
    // mailboxes lent need no copy: nothing is allocated per job.
    let mut workers = team
        .workers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    while workers.len() < parts - 1 {
        workers.push(spawn_worker()?);
    }
    // Parts 1..=lent run on the first `lent` workers, the rest here.
    let mut lent = 0;
    'lend: for (i, worker) in workers[..parts - 1].iter_mut().enumerate() {
        worker.part.store(i + 1, Ordering::Relaxed);
        // A worker that has ended (its mailbox [`retired`]) is replaced; where no thread
        // starts, this part and the ones after it run here.
        while worker
            .job
            .compare_exchange(
                core::ptr::null_mut(),
                job_ptr,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            match spawn_worker() {
                Some(fresh) => {
                    fresh.part.store(i + 1, Ordering::Relaxed);
                    *worker = fresh;
                }
                None => break 'lend,
            }
        }
        if worker.parked.load(Ordering::SeqCst)
            && let Some(thread) = worker.thread.get()
        {
            thread.unpark();
        }
        lent += 1;
    }
    // Our own part(s); a panic here must still wait for the workers, who borrow `f`.
    let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        f(0);
        for part in lent + 1..parts {
            f(part);
        }
    }));
    for worker in &workers[..lent] {
        let mut spins = 0u32;
        while !worker.job.load(Ordering::Acquire).is_null() {
            spins = spins.saturating_add(1);
            if spins < 1 << 16 {
                core::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
    }
    Some(own.map(|()| job.panicked.load(Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_across_many_jobs() {
        for parts in [1, 2, 3] {
            for _ in 0..200 {
                let counts: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                // Other tests may hold the team: then nothing runs, and we try again.
                while !run_parts(parts, &|p| {
                    counts[p].fetch_add(1, Ordering::Relaxed);
                }) {}
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let hits = AtomicUsize::new(0);
        for _ in 0..3 {
            while !run_parts(2, &|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            }) {}
            thread::sleep(SPIN * 3);
        }
        assert_eq!(hits.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_nested_call_is_refused_not_deadlocked() {
        let nested = AtomicUsize::new(0);
        while !run_parts(2, &|_| {
            if !run_parts(2, &|_| {}) {
                nested.fetch_add(1, Ordering::Relaxed);
            }
        }) {}
        assert_eq!(nested.load(Ordering::Relaxed), 2);
    }
}
