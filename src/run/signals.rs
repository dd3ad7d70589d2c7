//! SIGINT and SIGTERM as stop requests: the handler only counts them (an atomic increment is
//! all a signal handler may safely do); the drive loop polls the count.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static COUNTER: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
static LAST: AtomicI32 = AtomicI32::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The count of stop signals received since [`install`].
pub fn counter() -> Arc<AtomicUsize> {
    COUNTER
        .get_or_init(|| Arc::new(AtomicUsize::new(0)))
        .clone()
}

/// The last stop signal received (`SIGINT`, `SIGTERM`), or 0.
pub fn last() -> i32 {
    LAST.load(Ordering::SeqCst)
}

extern "C" fn on_signal(sig: libc::c_int) {
    LAST.store(sig, Ordering::SeqCst);
    if let Some(c) = COUNTER.get() {
        c.fetch_add(1, Ordering::SeqCst);
    }
}

/// Routes SIGINT and SIGTERM to the counter (idempotent).
pub fn install() {
    let _ = counter();
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches atomics, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    INSTALLED.store(true, Ordering::SeqCst);
}

/// Gives SIGINT and SIGTERM their default action back, if [`install`] took them.
pub fn restore() {
    if !INSTALLED.swap(false, Ordering::SeqCst) {
        return;
    }
    // SAFETY: resetting a signal's disposition to the default.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
    }
}
