//! Data-parallel training: the peers of one training run and what they exchange.
//!
//! A run has `world` peers (ranks), one per device: `devices:` gives the devices of this process
//! (threads, [`engine::MultiEngine`]), `--world-size/--rank/--coordinator` the processes
//! ([`ProcessGroup`]); peer rank = process rank x local devices + local index. The trainer needs
//! exactly two things from the others, both sums over all ranks:
//!
//! - the projections of the whole global batch (NT-Xent's negatives), by [`gather::gather_views`];
//! - BatchNorm's per-channel sums (global BN), in [`crate::cpu::batchnorm`], and the gradients,
//!   by [`gather::all_reduce_grads`].
//!
//! They go through one small interface, [`Peer`], on host buffers, so the trainer code is the
//! same whatever carries them. The carrier is burn's collective layer ([`collective`]): its local
//! mode between threads, its orchestrator and data service between processes and machines.

pub mod collective;
pub mod engine;
pub mod gather;

pub use collective::check_process_group;

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Why a collective call failed: the run stops (every rank must make every call).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PeerError {
    /// No answer within the timeout: a rank died, stalled or never started.
    #[error("rank {rank} of {world}: {what} got no answer within {timeout_s} s from {others}: a rank stopped, crashed or never started (check its output; raise --peer-timeout if a rank is legitimately slow)")]
    Timeout { rank: usize, world: usize, what: String, timeout_s: u64, others: String },
    /// The collective engine refused or failed.
    #[error("rank {rank} of {world}: {what} failed: {message} ({others} may have stopped)")]
    Engine { rank: usize, world: usize, what: String, message: String, others: String },
    /// Setting up the group failed (bad address, port in use, unreachable coordinator).
    #[error("{0}")]
    Setup(String),
}

/// One rank of a fixed group. Every rank makes the same calls, in the same order, with the same
/// lengths; a call that cannot complete in time is an `Err` and the run stops.
pub trait Peer: Send + Sync {
    /// This peer's rank, 0..world.
    fn rank(&self) -> usize;
    /// The number of peers.
    fn world(&self) -> usize;
    /// In place: `buf` = the sum over all ranks of their `buf`, the same bits on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), PeerError>;
    /// [`Peer::all_reduce_sum`] in f64 (BatchNorm's statistics).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), PeerError>;
}

/// A shared peer, cheap to clone into autodiff ops (which must be `Debug`). It keeps the first
/// error of a step: BatchNorm's collectives run inside burn's forward and backward passes,
/// which cannot return one, so they record it, skip the calls after it (each would wait for the
/// timeout again) and the trainer reports it at the end of the pass.
#[derive(Clone)]
pub struct PeerHandle {
    peer: Arc<dyn Peer>,
    failed: Arc<Mutex<Option<PeerError>>>,
}

impl fmt::Debug for PeerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Peer(rank {} of {})", self.peer.rank(), self.peer.world())
    }
}

impl PeerHandle {
    pub fn new(peer: Arc<dyn Peer>) -> Self {
        Self { peer, failed: Arc::new(Mutex::new(None)) }
    }
    pub fn rank(&self) -> usize {
        self.peer.rank()
    }
    pub fn world(&self) -> usize {
        self.peer.world()
    }
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), PeerError> {
        self.peer.all_reduce_sum(buf)
    }
    /// Sums `buf` over the ranks, or records the error (see the type's doc) and leaves `buf`.
    pub fn sum_f64_or_record(&self, buf: &mut [f64]) {
        let Ok(mut failed) = self.failed.lock() else { return };
        if failed.is_some() {
            return;
        }
        if let Err(e) = self.peer.all_reduce_sum_f64(buf) {
            *failed = Some(e);
        }
    }
    /// The error recorded since the last call, if any.
    pub fn take_error(&self) -> Option<PeerError> {
        self.failed.lock().ok().and_then(|mut f| f.take())
    }
}

/// The ranks other than `rank`, in words (for errors).
pub(crate) fn others(rank: usize, world: usize) -> String {
    let list: Vec<String> = (0..world).filter(|r| *r != rank).map(|r| r.to_string()).collect();
    match list.len() {
        0 => "no other rank".into(),
        1 => format!("rank {}", list[0]),
        _ => format!("ranks {}", list.join(", ")),
    }
}

/// The processes of a multi-process run (`--world-size`, `--rank`, `--coordinator`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessGroup {
    pub rank: usize,
    pub world: usize,
    /// `HOST:PORT` of rank 0's coordinator (burn's collective orchestrator).
    pub coordinator: String,
    /// How long a collective call may wait for the other ranks.
    pub timeout: Duration,
}

/// The default of `--peer-timeout`: long enough for a slow data-loading stall or a rank that
/// starts late, short enough that a dead rank does not hold a cluster for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

static PROCESS_GROUP: OnceLock<ProcessGroup> = OnceLock::new();
static LOCAL_TIMEOUT: OnceLock<Duration> = OnceLock::new();

/// Makes this process one rank of `group` (set once, by the command line, before the run).
pub fn set_process_group(group: ProcessGroup) -> Result<(), PeerError> {
    if group.world == 0 || group.rank >= group.world {
        return Err(PeerError::Setup(format!(
            "rank {} is not in a world of {} processes: ranks go from 0 to world size - 1",
            group.rank, group.world
        )));
    }
    let timeout = group.timeout;
    PROCESS_GROUP.set(group).map_err(|_| PeerError::Setup("the process group is already set".into()))?;
    let _ = LOCAL_TIMEOUT.set(timeout);
    Ok(())
}

/// Sets the collective timeout of a single-process run with several devices.
pub fn set_timeout(timeout: Duration) {
    let _ = LOCAL_TIMEOUT.set(timeout);
}

/// This process's group, when it is one rank of several.
pub fn process_group() -> Option<&'static ProcessGroup> {
    PROCESS_GROUP.get().filter(|g| g.world > 1)
}

/// This process's rank (0 when alone): only rank 0 writes the run directory.
pub fn process_rank() -> usize {
    process_group().map_or(0, |g| g.rank)
}

/// The processes in the run (1 when alone).
pub fn process_world() -> usize {
    process_group().map_or(1, |g| g.world)
}

/// (Ctrl-C / SIGTERM flag, the runtime's stop flag) of a multi-process run.
static FLAGS: OnceLock<(Arc<std::sync::atomic::AtomicBool>, Arc<std::sync::atomic::AtomicBool>)> =
    OnceLock::new();
static STOP_AGREED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static TRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A multi-process run: `signal` is raised by Ctrl-C / SIGTERM, `stop` is the runtime's stop
/// flag. A signal reaches the processes at different steps; while a data-parallel training runs,
/// it is only this rank's vote, carried by the next gradient exchange, and when any rank voted
/// every rank raises `stop` after that same step ([`stop_agreed`]), so all stop together and
/// rank 0 saves. Outside training (evaluation on rank 0) a signal stops the runtime at once.
pub fn set_interrupt_flags(
    signal: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    if FLAGS.set((signal.clone(), stop.clone())).is_err() {
        return;
    }
    let _ = std::thread::Builder::new().name("simclr-stop-watch".into()).spawn(move || loop {
        if signal.load(Ordering::SeqCst) && !TRAINING.load(Ordering::SeqCst) {
            stop.store(true, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// The runtime's stop flag of a multi-process run (see [`set_interrupt_flags`]).
pub fn runtime_stop_flag() -> Option<Arc<std::sync::atomic::AtomicBool>> {
    FLAGS.get().map(|f| f.1.clone())
}

/// Marks a data-parallel training as running (a signal is then a vote, not a stop).
pub(crate) fn set_training(active: bool) {
    TRAINING.store(active, std::sync::atomic::Ordering::SeqCst);
}

/// Whether this rank was interrupted (its vote in the next exchange).
pub(crate) fn interrupted_here() -> bool {
    FLAGS.get().is_some_and(|f| f.0.load(std::sync::atomic::Ordering::SeqCst))
}

/// Some rank was interrupted: every rank stops feeding and trains no further batch.
pub(crate) fn agree_stop() {
    STOP_AGREED.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(f) = FLAGS.get() {
        f.1.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether the ranks agreed to stop (see [`set_interrupt_flags`]).
pub fn stop_agreed() -> bool {
    STOP_AGREED.load(std::sync::atomic::Ordering::SeqCst)
}

pub(crate) fn timeout() -> Duration {
    LOCAL_TIMEOUT.get().copied().unwrap_or(DEFAULT_TIMEOUT)
}

/// The engine has one local server a process: unit tests that use it take turns.
#[cfg(test)]
pub(crate) static TEST_ENGINE: Mutex<()> = Mutex::new(());
