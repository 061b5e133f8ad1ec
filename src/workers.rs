//! Where sessions run (`[runtime]`): between the accept loops and
//! [`crate::session::serve`].
//!
//! `per-core` (the default): `workers` OS threads, each driving a
//! current-thread tokio runtime of its own. The accept loops run with the
//! control path (on the runtime that called [`crate::proxy::Proxy::start`])
//! and hand each accepted socket to the worker with the fewest sessions
//! (round-robin among equals), where the session lives until it ends: both
//! relay directions share one thread and one task, so one side's wake-up
//! never crosses to another thread and no task is stolen away.
//! `multi-thread`: sessions are spawned on the caller's runtime, as
//! everything else is (the binary then builds one work-stealing runtime of
//! `workers` threads).
//!
//! The hand-off moves the socket as a `std::net::TcpStream`: a tokio one is
//! bound to the reactor of the runtime that registered it.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{RuntimeFlavor, RuntimeSettings};

/// The sessions of one proxy: where they are spawned and the tracker that
/// counts them (for the graceful shutdown). Cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    tracker: TaskTracker,
    placement: Arc<Placement>,
}

enum Placement {
    /// On the runtime of whoever spawns them (`multi-thread`).
    Here,
    /// On dedicated worker threads (`per-core`).
    Workers(Vec<Worker>, AtomicUsize),
}

/// One worker thread and its runtime.
struct Worker {
    handle: Handle,
    /// Sessions on this worker now.
    sessions: Arc<AtomicUsize>,
    /// Cancelled to end the worker's runtime (and with it what still runs
    /// on it).
    stop: CancellationToken,
    /// Cancelled by the worker thread once its runtime is dropped.
    exited: CancellationToken,
}

impl Sessions {
    /// Starts the worker threads `runtime` asks for (none for
    /// `multi-thread`). Their timers run on `control`'s driver
    /// ([`crate::timers`]).
    pub fn start(runtime: RuntimeSettings, control: Handle) -> std::io::Result<Sessions> {
        let placement = match runtime.flavor {
            RuntimeFlavor::MultiThread => Placement::Here,
            RuntimeFlavor::PerCore => {
                let workers = (0..runtime.workers.max(1))
                    .map(|index| Worker::start(index, control.clone()))
                    .collect::<std::io::Result<_>>()?;
                Placement::Workers(workers, AtomicUsize::new(0))
            }
        };
        Ok(Sessions {
            tracker: TaskTracker::new(),
            placement: Arc::new(placement),
        })
    }

    /// Runs the session `session` makes of the accepted `tcp`, on this
    /// runtime or on the least-loaded worker, tracked until it returns.
    ///
    /// `session` is called here, at once: the future it returns is what the
    /// task holds (no wrapper keeping the closure and the socket beside
    /// it), and the session registers its socket where it runs, with
    /// [`Accepted::into_stream`].
    pub fn spawn<F, Fut>(&self, tcp: TcpStream, session: F)
    where
        F: FnOnce(Accepted) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (workers, next) = match &*self.placement {
            Placement::Here => {
                self.tracker.spawn(session(Accepted {
                    socket: Socket::Registered(tcp),
                    load: None,
                }));
                return;
            }
            Placement::Workers(workers, next) => (workers, next),
        };
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand an accepted connection to a worker");
                return;
            }
        };
        let worker = least_loaded(workers, next.fetch_add(1, Ordering::Relaxed));
        let accepted = Accepted {
            socket: Socket::Unregistered(tcp),
            load: Some(LoadGuard::new(worker.sessions.clone())),
        };
        worker
            .handle
            .spawn(self.tracker.track_future(session(accepted)));
    }

    /// Sessions open on each worker now (empty for `multi-thread`).
    pub fn per_worker(&self) -> Vec<usize> {
        match &*self.placement {
            Placement::Here => Vec::new(),
            Placement::Workers(workers, _) => workers
                .iter()
                .map(|w| w.sessions.load(Ordering::Relaxed))
                .collect(),
        }
    }

    /// No session is spawned after this; [`Sessions::wait`] can end.
    pub fn close(&self) {
        self.tracker.close();
    }

    /// Sessions still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Resolves once closed and every session has returned.
    pub async fn wait(&self) {
        self.tracker.wait().await
    }

    /// For `per-core`, after the sessions: waits until `deadline` for the
    /// workers to run no task at all (a task a session spawned may outlive
    /// it briefly; its credential lookup runs on the control runtime, see
    /// [`crate::timers::spawn_with_timers`]), then ends the worker threads
    /// and waits for them. Returns the tasks that were still alive, ended
    /// with their runtimes: nothing a session leaves behind outlives the
    /// proxy unseen.
    pub async fn stop_workers(&self, deadline: Instant) -> usize {
        let Placement::Workers(workers, _) = &*self.placement else {
            return 0;
        };
        let alive = || -> usize {
            workers
                .iter()
                .map(|w| w.handle.metrics().num_alive_tasks())
                .sum()
        };
        while alive() > 0 && Instant::now() < deadline {
            crate::timers::sleep(STRAY_TASK_POLL).await;
        }
        let left = alive();
        for w in workers {
            w.stop.cancel();
        }
        for w in workers {
            w.exited.cancelled().await;
        }
        left
    }
}

/// How often [`Sessions::stop_workers`] looks for tasks still alive.
const STRAY_TASK_POLL: Duration = Duration::from_millis(5);

/// The worker with the fewest sessions, the first one from `turn` (modulo
/// their number) among equals, so an idle proxy deals round-robin.
fn least_loaded(workers: &[Worker], turn: usize) -> &Worker {
    let n = workers.len();
    (0..n)
        .map(|k| &workers[(turn + k) % n])
        .min_by_key(|w| w.sessions.load(Ordering::Relaxed))
        .expect("at least one worker")
}

impl Worker {
    fn start(index: usize, control: Handle) -> std::io::Result<Worker> {
        // No time driver: its wheel would be scanned at every park, about
        // twice per transaction. Sessions time on `control` instead.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let exited = CancellationToken::new();
        let (stopped, done) = (stop.clone(), exited.clone());
        std::thread::Builder::new()
            .name(format!("pgpivot-worker-{index}"))
            .spawn(move || {
                crate::timers::lend(control);
                runtime.block_on(stopped.cancelled());
                // Drops what still runs here (after a shutdown timeout).
                drop(runtime);
                done.cancel();
            })?;
        Ok(Worker {
            handle,
            sessions: Arc::default(),
            stop,
            exited,
        })
    }
}

impl Drop for Worker {
    /// A proxy dropped without a shutdown: the thread ends on its own.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An accepted connection on its way to the thread its session runs on.
pub struct Accepted {
    socket: Socket,
    load: Option<LoadGuard>,
}

enum Socket {
    /// Registered with the runtime that accepted it (`multi-thread`).
    Registered(TcpStream),
    /// To be registered by the worker's runtime (a tokio socket is bound to
    /// the reactor that registered it).
    Unregistered(std::net::TcpStream),
}

impl Accepted {
    /// The connection as a tokio stream of the runtime polling the caller,
    /// and what counts the session on its worker while it lives.
    pub fn into_stream(self) -> std::io::Result<(TcpStream, Placed)> {
        let tcp = match self.socket {
            Socket::Registered(tcp) => tcp,
            Socket::Unregistered(tcp) => TcpStream::from_std(tcp)?,
        };
        Ok((tcp, Placed { _load: self.load }))
    }
}

/// Held by a session for its life: it counts the session on its worker,
/// which placement reads (see [`Sessions::spawn`]).
pub struct Placed {
    _load: Option<LoadGuard>,
}

/// Counts one session on a worker until dropped.
struct LoadGuard(Arc<AtomicUsize>);

impl LoadGuard {
    fn new(sessions: Arc<AtomicUsize>) -> LoadGuard {
        sessions.fetch_add(1, Ordering::Relaxed);
        LoadGuard(sessions)
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_core(workers: usize) -> Sessions {
        Sessions::start(
            RuntimeSettings {
                flavor: RuntimeFlavor::PerCore,
                workers,
            },
            Handle::current(),
        )
        .unwrap()
    }

    /// A connected pair: the accepted end and the client end.
    async fn pair(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    #[tokio::test]
    async fn sessions_spread_over_the_workers_and_stay_on_one_thread() {
        let sessions = per_core(2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (threads, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (accepted, client) = pair(&listener).await;
            clients.push(client);
            let threads = threads.clone();
            sessions.spawn(accepted, move |accepted| async move {
                use tokio::io::AsyncReadExt;
                let (mut tcp, _placed) = accepted.into_stream().unwrap();
                let first = std::thread::current().id();
                // Lives until its client hangs up, with a wake-up between.
                let mut byte = [0u8; 1];
                let _ = tcp.read(&mut byte).await;
                let _ = threads.send((first, std::thread::current().id()));
            });
        }
        assert_eq!(sessions.per_worker(), vec![2, 2]);
        drop(clients);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..4 {
            let (first, last) = seen.recv().await.unwrap();
            assert_eq!(first, last, "a session moved between threads");
            assert_ne!(first, std::thread::current().id());
            firsts.insert(first);
        }
        assert_eq!(firsts.len(), 2, "both workers ran sessions");
        sessions.close();
        sessions.wait().await;
        assert_eq!(sessions.stop_workers(Instant::now()).await, 0);
        assert_eq!(sessions.per_worker(), vec![0, 0]);
    }

    #[tokio::test]
    async fn stopping_the_workers_ends_and_counts_what_still_runs() {
        let sessions = per_core(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (accepted, _client) = pair(&listener).await;
        let (started, ready) = tokio::sync::oneshot::channel();
        sessions.spawn(accepted, move |accepted| async move {
            let _placed = accepted.into_stream().unwrap();
            let _ = started.send(());
            std::future::pending::<()>().await
        });
        ready.await.unwrap();
        sessions.close();
        assert_eq!(sessions.len(), 1);
        let deadline = Instant::now() + Duration::from_millis(20);
        assert_eq!(sessions.stop_workers(deadline).await, 1);
        // Its runtime is gone, and the session with it.
        sessions.wait().await;
    }

    #[tokio::test]
    async fn multi_thread_spawns_here() {
        let sessions = Sessions::start(
            RuntimeSettings {
                flavor: RuntimeFlavor::MultiThread,
                workers: 4,
            },
            Handle::current(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (accepted, _client) = pair(&listener).await;
        let here = std::thread::current().id();
        let (tx, rx) = tokio::sync::oneshot::channel();
        sessions.spawn(accepted, move |accepted| async move {
            let _placed = accepted.into_stream().unwrap();
            let _ = tx.send(std::thread::current().id());
        });
        assert_eq!(rx.await.unwrap(), here);
        assert!(sessions.per_worker().is_empty());
    }
}
