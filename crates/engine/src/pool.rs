//! A fork-join pool for the per-token work: a matrix product is split into chunks, and the
//! calling thread and the pool's workers claim chunks until none is left.
//!
//! Why not rayon: decoding one token runs a few hundred small products, each a fraction of
//! a millisecond. Rayon parks idle workers at once and wakes them through the kernel for
//! every product; on this 2-core machine that hand-off cost more than the second core
//! gave back (docs/PERFORMANCE.md). Here a worker that has just finished keeps watching for
//! the next job for a short while (`SPIN`), so back-to-back products of one token reach it
//! in well under a microsecond, and only then parks: idle nodes do not burn a core, and
//! several processes sharing two cores (pipeline stages on one test machine) do not starve
//! each other for longer than that.
//!
//! One job at a time: a second caller (another session's thread, or a chunk that itself
//! asks for parallel work) finds the pool busy and runs its chunks itself. Results never
//! depend on which thread ran a chunk.

#![allow(unsafe_code)] // the job is shared with the workers as a raw pointer, see `Job`

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker keeps watching for the next job before it parks.
const SPIN: Duration = Duration::from_micros(100);
/// Runs of consecutive chunks per thread and job (see `claim_chunks`).
const RUNS_PER_THREAD: usize = 4;
/// For how much of that it spins without yielding the core.
const HOT_SPIN: Duration = Duration::from_micros(5);

/// `state` bits: the number of workers inside the current job, a "closed" flag (no worker
/// may enter any more), and the job's sequence number above them.
const ACTIVE_MASK: u64 = (1 << 32) - 1;
const CLOSED: u64 = 1 << 32;
const SEQ_SHIFT: u32 = 33;
const SEQ_MASK: u64 = (1 << (64 - SEQ_SHIFT)) - 1;

/// The job being run: its chunk function, with its lifetime erased. Only dereferenced by
/// a worker that entered the job (counted in `state`) before it was closed; the caller
/// does not return, and so the function outlives every use, until that count is back to 0.
#[derive(Clone, Copy)]
struct Job {
    run: *const (dyn Fn(usize) + Sync),
    chunks: usize,
    workers: usize,
}

// Safety: the pointee is `Sync`, and `Job` is only read under the protocol above.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

struct Shared {
    state: AtomicU64,
    /// The next chunk to claim.
    next: AtomicUsize,
    job: Mutex<Option<Job>>,
    /// A chunk panicked: the caller re-raises it.
    panicked: AtomicBool,
    /// Workers asleep on `wake`.
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

/// The engine's pool: `threads() - 1` workers plus whichever thread calls [`for_each`].
pub(crate) struct Pool {
    shared: &'static Shared,
    workers: usize,
    /// Held by the one caller whose job the workers are serving.
    busy: Mutex<()>,
}

/// Threads the kernels use: `RAYON_NUM_THREADS` if set (the CLI's `--threads` sets it, for
/// candle's sake as well), else every core.
pub(crate) fn threads() -> usize {
    pool().workers + 1
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        Pool::start(threads - 1)
    })
}

thread_local! {
    /// Set by [`with_threads`] (tests): at most this many threads take part.
    static MAX_THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Runs `f` with at most `n` kernel threads taking part in this thread's jobs (results do
/// not depend on it; tests check that they do not).
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    let before = MAX_THREADS.with(|m| m.replace(n.max(1)));
    let out = f();
    MAX_THREADS.with(|m| m.set(before));
    out
}

/// Calls `f(i)` for every `i < chunks`, on this thread and the pool's workers.
pub(crate) fn for_each(chunks: usize, f: impl Fn(usize) + Sync) {
    let threads = MAX_THREADS.with(|m| m.get()).min(threads());
    if chunks <= 1 || threads <= 1 {
        (0..chunks).for_each(f);
        return;
    }
    pool().run(chunks, threads - 1, &f);
}

/// `f(i, chunk)` for every `chunk_len`-long piece of `data` (the last one may be shorter),
/// in parallel as [`for_each`].
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let len = data.len();
    if chunk_len == 0 || len == 0 {
        return;
    }
    let base = SendPtr(data.as_mut_ptr());
    for_each(len.div_ceil(chunk_len), |i| {
        let start = i * chunk_len;
        let n = chunk_len.min(len - start);
        // Safety: chunk `i` is `[start, start + n)` of `data`, which the caller lends
        // mutably for the whole call, and every `i` is passed exactly once: the chunks
        // are disjoint.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, chunk);
    });
}

/// A raw pointer that may cross threads (the chunks it points to are disjoint).
struct SendPtr<T>(*mut T);
// Safety: only used to hand disjoint chunks of a `&mut [T: Send]` to other threads.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    // A method, so closures capture the whole (Sync) wrapper, not the raw field.
    fn get(&self) -> *mut T {
        self.0
    }
}

impl Pool {
    fn start(workers: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            job: Mutex::new(None),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let mut started = 0;
        for index in 0..workers {
            let spawned = std::thread::Builder::new()
                .name(format!("shoal-kernel-{index}"))
                .spawn(move || worker(shared, index));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a kernel thread");
                    break;
                }
            }
        }
        Pool {
            shared,
            workers: started,
            busy: Mutex::new(()),
        }
    }

    fn run(&self, chunks: usize, workers: usize, f: &(dyn Fn(usize) + Sync)) {
        let _busy = match self.busy.try_lock() {
            Ok(guard) => guard,
            // A chunk panicked under an earlier job: the pool itself is intact.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // Another job is running (or this is a chunk of it): do it here.
                (0..chunks).for_each(f);
                return;
            }
        };
        let s = self.shared;
        // Safety: the lifetime is erased only for the workers; see `Job`.
        let run: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        *s.job.lock().unwrap_or_else(PoisonError::into_inner) = Some(Job {
            run,
            chunks,
            workers,
        });
        s.next.store(0, Ordering::SeqCst);
        // The sequence number wraps (after 2^31 jobs); workers only compare it for equality.
        let seq = ((s.state.load(Ordering::SeqCst) >> SEQ_SHIFT) + 1) & SEQ_MASK;
        s.state.store(seq << SEQ_SHIFT, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.sleep.lock().unwrap_or_else(PoisonError::into_inner);
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| claim_chunks(s, chunks, workers + 1, f)));
        // No worker may enter from now on; wait for those inside to leave.
        s.state.fetch_or(CLOSED, Ordering::SeqCst);
        // Usually a few chunks' time; but a worker preempted in the middle of a chunk
        // (more runnable threads than cores: stages sharing a machine) would keep a
        // spinning caller off the core it needs, so past a short spin, yield it.
        let mut spins = 0u32;
        while s.state.load(Ordering::SeqCst) & ACTIVE_MASK != 0 {
            spins = spins.saturating_add(1);
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a kernel chunk panicked on a pool thread");
        }
    }
}

/// Claims and runs chunks until none is left. Chunks are claimed in runs of consecutive
/// ones, a few runs per thread: each thread then reads long stretches of a matrix, which
/// the hardware prefetchers follow; claiming chunk by chunk interleaved the threads 16
/// rows at a time, and two-thread decode ran slower than one.
fn claim_chunks(s: &Shared, chunks: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
    let run = (chunks / (RUNS_PER_THREAD * threads)).max(1);
    loop {
        let start = s.next.fetch_add(1, Ordering::Relaxed).saturating_mul(run);
        if start >= chunks {
            return;
        }
        (start..(start + run).min(chunks)).for_each(f);
    }
}

/// Sleeps until a job newer than `seen` is published.
fn park(s: &Shared, seen: u64) {
    let guard = s.sleep.lock().unwrap_or_else(PoisonError::into_inner);
    s.sleepers.fetch_add(1, Ordering::SeqCst);
    let guard = s
        .wake
        .wait_while(guard, |_| {
            s.state.load(Ordering::SeqCst) >> SEQ_SHIFT == seen
        })
        .unwrap_or_else(PoisonError::into_inner);
    s.sleepers.fetch_sub(1, Ordering::SeqCst);
    drop(guard);
}

fn worker(s: &'static Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for a job newer than the last one seen: spin a little, then sleep.
        let started = Instant::now();
        let mut state = s.state.load(Ordering::SeqCst);
        let mut spins = 0u32;
        let mut yielding = false;
        while state >> SEQ_SHIFT == seen {
            spins = spins.wrapping_add(1);
            if yielding || spins.is_multiple_of(64) {
                let waited = started.elapsed();
                if waited > SPIN {
                    park(s, seen);
                    yielding = false;
                } else if waited > HOT_SPIN {
                    // Past the first microseconds, give the core to any other runnable
                    // thread (on a loaded machine, maybe the caller) while still watching.
                    yielding = true;
                    std::thread::yield_now();
                }
            } else {
                std::hint::spin_loop();
            }
            state = s.state.load(Ordering::SeqCst);
        }
        seen = state >> SEQ_SHIFT;
        // Enter the job unless it is closed already (or a newer one replaced it).
        let entered = loop {
            if state >> SEQ_SHIFT != seen || state & CLOSED != 0 {
                break false;
            }
            match s.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break true,
                Err(now) => state = now,
            }
        };
        if !entered {
            continue;
        }
        let job = *s.job.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(job) = job.filter(|j| index < j.workers) {
            // Safety: this worker entered the job before it was closed, so the caller is
            // still waiting in `run` and the function is alive.
            let f = unsafe { &*job.run };
            if catch_unwind(AssertUnwindSafe(|| {
                claim_chunks(s, job.chunks, job.workers + 1, f)
            }))
            .is_err()
            {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.state.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_exactly_once_on_any_thread_count() {
        for threads in 1..=3 {
            with_threads(threads, || {
                for len in [0usize, 1, 7, 64, 1000] {
                    let mut data = vec![0u32; len];
                    for_each_chunk_mut(&mut data, 16, |i, chunk| {
                        for (j, x) in chunk.iter_mut().enumerate() {
                            *x += (i * 16 + j) as u32 + 1;
                        }
                    });
                    let want: Vec<u32> = (1..=len as u32).collect();
                    assert_eq!(data, want, "threads {threads}, len {len}");
                }
            });
        }
    }

    #[test]
    fn jobs_after_the_workers_slept_still_run() {
        let mut data = vec![0u8; 256];
        for_each_chunk_mut(&mut data, 8, |_, c| c.fill(1));
        std::thread::sleep(SPIN * 20);
        for_each_chunk_mut(&mut data, 8, |_, c| c.iter_mut().for_each(|x| *x += 1));
        assert!(data.iter().all(|&x| x == 2));
    }

    #[test]
    fn concurrent_callers_and_nested_jobs_complete() {
        let totals: Vec<usize> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    scope.spawn(move || {
                        let sum = AtomicUsize::new(0);
                        for_each(50, |i| {
                            // A nested job runs on the calling thread.
                            for_each(3, |j| {
                                sum.fetch_add(i * 3 + j + t, Ordering::Relaxed);
                            });
                        });
                        sum.into_inner()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        for (t, total) in totals.into_iter().enumerate() {
            assert_eq!(total, (0..150).sum::<usize>() + 150 * t);
        }
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller_and_the_pool_survives() {
        let r = catch_unwind(|| {
            for_each(32, |i| {
                if i == 17 {
                    panic!("chunk 17");
                }
            })
        });
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        for_each(32, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.into_inner(), 32);
        // And its workers still take part (not everything on the caller from now on).
        // Tries a few times: another test may hold the pool at that moment, and then a
        // job rightly runs on its caller alone.
        if threads() > 1 {
            let caller = std::thread::current().id();
            let worker_took_part = (0..20).any(|_| {
                let elsewhere = AtomicUsize::new(0);
                for_each(16, |_| {
                    std::thread::sleep(Duration::from_millis(1));
                    if std::thread::current().id() != caller {
                        elsewhere.fetch_add(1, Ordering::Relaxed);
                    }
                });
                elsewhere.into_inner() > 0
            });
            assert!(worker_took_part, "no worker took part after the panic");
        }
    }
}
