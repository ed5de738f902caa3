//! The async runtime that I/O-bound stages (`enrich`) run their calls on: one per
//! process, two worker threads, started on first use. CPU stages never touch it;
//! an I/O stage's handler returns at once (a deferred result, see
//! `actio_runtime::Deferred`) and its call waits here without holding a worker.

use std::future::Future;
use std::sync::OnceLock;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// Worker threads of the I/O runtime: I/O waits, it does not compute.
pub const IO_THREADS: usize = 2;

/// The I/O runtime.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(IO_THREADS)
            .thread_name("actio-io")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the I/O runtime: {e}"))
    })
}

/// Runs `f` on the I/O runtime.
pub fn spawn<F: Future<Output = ()> + Send + 'static>(f: F) {
    runtime().spawn(f);
}
