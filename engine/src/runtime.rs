//! Running a process's main future on the async runtime's own threads.
//!
//! `Runtime::block_on` polls the future it is given on the calling thread
//! (the process's main thread), outside the runtime's worker threads. A
//! worker's pull loop or an intake's accept loop living there paid a thread
//! wake-up for every event it handled: the main thread woke on a futex,
//! spawned the work and woke a scheduler thread back (about 0.1 ms per task
//! at low load, `loadtest/README.md`, change 26). Spawned instead, the main
//! future runs beside everything it wakes.

use tokio::runtime::Runtime;
use tokio::task::JoinError;

/// Runs `main` to completion as a task of `runtime`, on its worker threads.
///
/// # Errors
/// The [`JoinError`] of a `main` that panicked.
pub fn block_on_workers<F>(runtime: &Runtime, main: F) -> Result<F::Output, JoinError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime.block_on(runtime.spawn(main))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_main_future_runs_on_a_worker_thread_not_the_caller() {
        let rt = runtime();
        let caller = std::thread::current().id();
        let ran_on = block_on_workers(&rt, async { std::thread::current().id() }).unwrap();
        assert_ne!(ran_on, caller, "the main future ran on the calling thread");
    }

    #[test]
    fn a_panicking_main_future_is_an_error_not_an_unwind() {
        let rt = runtime();
        let outcome = block_on_workers(&rt, async { panic!("boom") });
        assert!(outcome.unwrap_err().is_panic());
    }
}
