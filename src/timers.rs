//! Timers for code that may run on a session worker, and where they run.
//!
//! The `per-core` workers' runtimes ([`crate::workers`]) have no time
//! driver. With one, every park of a worker (about two per transaction)
//! locks and scans a timer wheel and reads the clock: some 800 instructions
//! per transaction, for timers a relaying session does not hold. What
//! sessions time (a login, a connect, a hold, an end's grace, a move) is
//! timed on the control runtime's driver instead: a worker thread is lent
//! that runtime's handle ([`lend`]) before it starts, and every timer in
//! pgpivot is made here, registered with the lent driver when there is one.
//! The control thread fires it and wakes the session's task on its worker,
//! which happens at logins, ends and moves, never per transaction.
//!
//! On every other thread (the control runtime itself, the `multi-thread`
//! runtime, tests) these are tokio's own functions, on the current runtime.
//! `clippy.toml` disallows tokio's timer functions elsewhere, so no timer
//! can be made where no driver would fire it (tokio would panic).

use std::cell::RefCell;
use std::future::{Future, IntoFuture};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, Sleep, Timeout};

thread_local! {
    /// The control runtime, on a worker thread.
    static LENT: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// Makes this thread's timers on `control`'s driver from now on. Called by
/// a worker thread before it runs its (timerless) runtime.
pub fn lend(control: Handle) {
    LENT.with(|lent| *lent.borrow_mut() = Some(control));
}

/// Runs `make` in the lent runtime's context, if this thread has one: a
/// tokio timer registers with the driver of the context it is made in.
fn on_timer_driver<T>(make: impl FnOnce() -> T) -> T {
    LENT.with(|lent| match &*lent.borrow() {
        Some(control) => {
            let _entered = control.enter();
            make()
        }
        None => make(),
    })
}

/// [`tokio::time::sleep`], on the lent driver.
#[allow(clippy::disallowed_methods)]
pub fn sleep(duration: Duration) -> Sleep {
    on_timer_driver(|| tokio::time::sleep(duration))
}

/// [`tokio::time::sleep_until`], on the lent driver.
#[allow(clippy::disallowed_methods)]
pub fn sleep_until(deadline: Instant) -> Sleep {
    on_timer_driver(|| tokio::time::sleep_until(deadline))
}

/// [`tokio::time::timeout`], on the lent driver.
#[allow(clippy::disallowed_methods)]
pub fn timeout<F: IntoFuture>(duration: Duration, future: F) -> Timeout<F::IntoFuture> {
    // Made into a future outside the lent context: nothing it spawns may
    // land on the control runtime.
    let future = future.into_future();
    on_timer_driver(|| tokio::time::timeout(duration, future))
}

/// [`tokio::time::timeout_at`], on the lent driver.
#[allow(clippy::disallowed_methods)]
pub fn timeout_at<F: IntoFuture>(deadline: Instant, future: F) -> Timeout<F::IntoFuture> {
    let future = future.into_future();
    on_timer_driver(|| tokio::time::timeout_at(deadline, future))
}

/// [`tokio::time::interval`], on the lent driver.
#[allow(clippy::disallowed_methods)]
pub fn interval(period: Duration) -> Interval {
    on_timer_driver(|| tokio::time::interval(period))
}

/// [`tokio::time::interval_at`], on the lent driver.
#[allow(clippy::disallowed_methods)]
pub fn interval_at(start: Instant, period: Duration) -> Interval {
    on_timer_driver(|| tokio::time::interval_at(start, period))
}

/// Spawns `task` where timers work: on the lent runtime from a worker
/// thread, else on the current one. For background work that makes timers
/// inside code pgpivot does not own (tokio-postgres's connect timeout).
#[allow(clippy::disallowed_methods)]
pub fn spawn_with_timers<F>(task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    LENT.with(|lent| match &*lent.borrow() {
        Some(control) => control.spawn(task),
        None => tokio::spawn(task),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on a worker-like thread, lent `control`, without
    /// blocking the caller's runtime (so its driver can fire the timers).
    async fn on_lent_thread<T: Send + 'static>(
        control: Handle,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let thread = std::thread::spawn(move || {
            lend(control);
            body()
        });
        tokio::task::spawn_blocking(move || thread.join().expect("the thread ran"))
            .await
            .unwrap()
    }

    /// The control runtime is current-thread, as the binary's is: parked
    /// with no timer of its own, it must be woken by a timer a worker makes.
    #[tokio::test]
    async fn a_lent_thread_times_on_the_control_driver() {
        let control = Handle::current();
        let (fired, timed_out, spawned) = on_lent_thread(control, || {
            let worker = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .unwrap();
            worker.block_on(async {
                let started = Instant::now();
                sleep(Duration::from_millis(20)).await;
                let fired = started.elapsed() >= Duration::from_millis(20);
                let timed_out = timeout(Duration::from_millis(10), std::future::pending::<()>())
                    .await
                    .is_err();
                // Made on the worker thread, run on the control runtime.
                let spawned_on = spawn_with_timers(async { std::thread::current().id() })
                    .await
                    .unwrap();
                (fired, timed_out, spawned_on != std::thread::current().id())
            })
        })
        .await;
        assert!(fired, "the sleep ended at its deadline, not before");
        assert!(
            timed_out,
            "a timeout fires on a runtime with no time driver"
        );
        assert!(
            spawned,
            "spawn_with_timers ran the task on the control runtime"
        );
    }

    #[test]
    #[should_panic(expected = "timers are disabled")]
    fn without_a_lent_driver_a_timerless_runtime_cannot_time() {
        // What `lend` prevents: tokio's own timers on a worker's runtime.
        let worker = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        worker.block_on(async { sleep(Duration::from_millis(1)).await });
    }
}
