//! SIGINT / SIGTERM: the first one asks the run to stop cleanly (checkpoint saved), a second
//! one exits at once; the exit code says which signal it was (130 or 143).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The process's Ctrl-C flag; the handler is installed on first use.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        install_signal_handler(flag.clone());
        flag
    })
    .clone()
}

/// The signal that stopped the run (SIGINT unless SIGTERM came): its exit code is 128 + it.
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(2);

/// The exit code of an interrupted run: 130 after SIGINT (Ctrl-C), 143 after SIGTERM.
pub fn interrupted_exit_code() -> i32 {
    128 + STOP_SIGNAL.load(Ordering::SeqCst)
}

/// First SIGINT or SIGTERM: set `flag` (the run finishes its current step or samples, saves a
/// checkpoint and stops); a second one exits at once.
#[cfg(unix)]
fn install_signal_handler(flag: Arc<AtomicBool>) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot install the SIGINT/SIGTERM handler ({e}): a signal stops the run at once");
            return;
        }
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if flag.swap(true, Ordering::SeqCst) {
                // A second signal: the user (or the scheduler) wants out now.
                std::process::exit(128 + sig);
            }
            STOP_SIGNAL.store(sig, Ordering::SeqCst);
            let name = if sig == SIGTERM { "SIGTERM" } else { "interrupt" };
            eprintln!(
                "\n{name}: finishing the current step or samples, then saving (send it again to quit now)"
            );
        }
    });
}

#[cfg(not(unix))]
fn install_signal_handler(flag: Arc<AtomicBool>) {
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current samples (Ctrl-C again to quit now)");
    });
}
