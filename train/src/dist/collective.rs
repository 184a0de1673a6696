//! [`Peer`] on burn's collective layer (`burn-collective`, vendored with two fixes:
//! `vendor/burn-collective/PATCHES.md`).
//!
//! Each peer owns a thread that makes the engine's blocking calls, so a call can time out: the
//! engine has no timeouts, and a rank that died would otherwise hold the others forever. Within
//! a process the peers meet in the engine's local server (threads); with a [`ProcessGroup`]
//! each process is one node of the engine's global mode: rank 0 hosts the orchestrator on the
//! coordinator port, and node `r` serves tensors on the coordinator port + 1 + r.

use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};

use super::{others, Peer, PeerError, ProcessGroup};
use crate::device::panic_message;

enum Job {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Finish,
}

enum Reply {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Done,
    Failed(String),
}

/// One rank, talking to the others through burn-collective.
pub struct CollectivePeer {
    rank: usize,
    world: usize,
    timeout: Duration,
    link: Mutex<(Sender<Job>, Receiver<Reply>)>,
    /// Whether the group formed (a peer that never joined does not wait to leave).
    joined: bool,
    /// Calls, bytes sent and seconds spent in them (waiting for the others included), logged
    /// when the peer leaves: what the run's communication cost.
    traffic: Mutex<(u64, u64, f64)>,
    /// Set by a call that failed or timed out: its reply may still come, so no later call can
    /// trust the channel (each fails at once).
    broken: std::sync::atomic::AtomicBool,
}

/// Where a process's node of the engine is: the coordinator's host and port, parsed.
fn split_host_port(coordinator: &str) -> Result<(String, u16), PeerError> {
    let bad = |why: &str| {
        PeerError::Setup(format!(
            "--coordinator `{coordinator}`: {why}; give HOST:PORT, e.g. 10.0.0.1:29500 (or set MASTER_ADDR and MASTER_PORT)"
        ))
    };
    let (host, port) = coordinator.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number from 1 to 65535"))?;
    if host.is_empty() || port == 0 {
        return Err(bad("empty host or port 0"));
    }
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// The port node `rank` serves tensors on.
fn data_port(port: u16, rank: usize) -> Result<u16, PeerError> {
    u16::try_from(usize::from(port) + 1 + rank).map_err(|_| {
        PeerError::Setup(format!(
            "the coordinator port {port} leaves no room for rank {rank}'s data port (port + 1 + rank); use a lower port"
        ))
    })
}

/// This machine's address as the coordinator sees it (the interface a route to it leaves by;
/// no packet is sent). `SIMCLR_NODE_HOST` overrides it.
fn own_host(coordinator_host: &str, port: u16) -> String {
    if let Ok(h) = std::env::var("SIMCLR_NODE_HOST") {
        return h;
    }
    let routed = (coordinator_host, port).to_socket_addrs().ok().and_then(|mut a| a.next()).and_then(|to| {
        let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let s = UdpSocket::bind(any).ok()?;
        s.connect(to).ok()?;
        s.local_addr().ok()
    });
    match routed {
        Some(a) if a.is_ipv6() => format!("[{}]", a.ip()),
        Some(a) => a.ip().to_string(),
        None => "127.0.0.1".into(),
    }
}

static ORCHESTRATOR: OnceLock<Result<(), String>> = OnceLock::new();

/// Checks the process group before the run, so a bad one is a clear error at once: rank 0
/// starts the orchestrator (its port must be free), the others wait for it to answer.
pub fn check_process_group(group: &ProcessGroup) -> Result<(), PeerError> {
    let (host, port) = split_host_port(&group.coordinator)?;
    data_port(port, group.world - 1)?;
    if group.rank == 0 {
        return start_orchestrator(port);
    }
    let deadline = Instant::now() + group.timeout.min(Duration::from_secs(120));
    let addrs: Vec<_> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| {
            PeerError::Setup(format!("--coordinator {}: cannot resolve {host}: {e}", group.coordinator))
        })?
        .collect();
    loop {
        if addrs.iter().any(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(PeerError::Setup(format!(
                "rank {}: the coordinator {} did not answer within {} s: start rank 0 with the same --coordinator, check the address and that the port is open",
                group.rank,
                group.coordinator,
                group.timeout.min(Duration::from_secs(120)).as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Rank 0: burn-collective's orchestrator on `port`, on a thread of its own, once a process.
fn start_orchestrator(port: u16) -> Result<(), PeerError> {
    ORCHESTRATOR
        .get_or_init(|| {
            // The engine logs a bind failure and returns; checking first gives a real error.
            TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
                format!("rank 0 cannot listen on the coordinator port {port}: {e} (is another run using it? pick another --coordinator port)")
            })?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the coordinator's runtime: {e}"))?;
            std::thread::Builder::new()
                .name("simclr-coordinator".into())
                .spawn(move || rt.block_on(burn_collective::start_global_orchestrator(port)))
                .map_err(|e| format!("cannot start the coordinator thread: {e}"))?;
            Ok(())
        })
        .clone()
        .map_err(PeerError::Setup)
}

impl CollectivePeer {
    /// Joins the group as local peer `local` of `locals` in this process (and, with `group`,
    /// as one of its processes). Returns once every peer of the group has joined.
    pub fn join(
        local: usize,
        locals: usize,
        group: Option<&ProcessGroup>,
        timeout: Duration,
    ) -> Result<Self, PeerError> {
        let (rank, world) = match group {
            Some(g) => (g.rank * locals + local, g.world * locals),
            None => (local, locals),
        };
        let mut config = CollectiveConfig::default()
            .with_num_devices(locals)
            .with_local_all_reduce_strategy(AllReduceStrategy::Centralized);
        if let Some(g) = group {
            let (host, port) = split_host_port(&g.coordinator)?;
            let dport = data_port(port, g.rank)?;
            let me = own_host(&host, port);
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            let (Ok(global), Ok(node)) =
                (format!("ws://{host}:{port}").parse(), format!("ws://{me}:{dport}").parse())
            else {
                return Err(PeerError::Setup(format!("bad coordinator address {}", g.coordinator)));
            };
            config = config
                .with_num_nodes(g.world as u32)
                .with_global_address(global)
                .with_node_address(node)
                .with_data_service_port(dport)
                .with_global_all_reduce_strategy(AllReduceStrategy::Centralized);
        }
        let (job_tx, job_rx) = channel::<Job>();
        let (reply_tx, reply_rx) = channel::<Reply>();
        std::thread::Builder::new()
            .name(format!("simclr-peer-{rank}"))
            .spawn(move || serve(PeerId::from(local), config, &job_rx, &reply_tx))
            .map_err(|e| PeerError::Setup(format!("cannot start peer {rank}'s thread: {e}")))?;
        let mut peer = Self {
            rank,
            world,
            timeout,
            link: Mutex::new((job_tx, reply_rx)),
            joined: false,
            traffic: Mutex::new((0, 0, 0.0)),
            broken: Default::default(),
        };
        match peer.wait("joining the group")? {
            Reply::Done => {
                peer.joined = true;
                Ok(peer)
            }
            Reply::Failed(m) => Err(peer.engine_error("joining the group", m)),
            _ => Err(peer.engine_error("joining the group", "unexpected reply".into())),
        }
    }

    fn engine_error(&self, what: &str, message: String) -> PeerError {
        // The engine's thread dies when a peer's connection drops (see PATCHES.md); its callers
        // then see `LocalServerMissing`.
        let message = if message.contains("LocalServerMissing") || message.contains("closed") {
            "the connection to the other ranks was lost (a rank stopped or crashed)".to_string()
        } else {
            message
        };
        PeerError::Engine {
            rank: self.rank,
            world: self.world,
            what: what.into(),
            message,
            others: others(self.rank, self.world),
        }
    }

    fn wait(&self, what: &str) -> Result<Reply, PeerError> {
        let link = self.link.lock().map_err(|_| self.engine_error(what, "a peer thread panicked".into()))?;
        match link.1.recv_timeout(self.timeout) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(PeerError::Timeout {
                rank: self.rank,
                world: self.world,
                what: what.into(),
                timeout_s: self.timeout.as_secs(),
                others: others(self.rank, self.world),
            }),
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.engine_error(what, "the peer thread ended".into()))
            }
        }
    }

    fn call(&self, job: Job, what: &str) -> Result<Reply, PeerError> {
        let bytes = match &job {
            Job::F32(v) => 4 * v.len(),
            Job::F64(v) => 8 * v.len(),
            Job::Finish => 0,
        } as u64;
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::SeqCst) {
            return Err(self.engine_error(what, "an earlier exchange of this rank failed".into()));
        }
        let t = Instant::now();
        let out = self.call_inner(job, what);
        if out.is_err() {
            self.broken.store(true, Ordering::SeqCst);
        }
        if let Ok(mut tr) = self.traffic.lock() {
            *tr = (tr.0 + 1, tr.1 + bytes, tr.2 + t.elapsed().as_secs_f64());
        }
        out
    }

    fn call_inner(&self, job: Job, what: &str) -> Result<Reply, PeerError> {
        {
            let link =
                self.link.lock().map_err(|_| self.engine_error(what, "a peer thread panicked".into()))?;
            link.0.send(job).map_err(|_| self.engine_error(what, "the peer thread ended".into()))?;
        }
        match self.wait(what)? {
            Reply::Failed(m) => Err(self.engine_error(what, m)),
            r => Ok(r),
        }
    }
}

impl Drop for CollectivePeer {
    fn drop(&mut self) {
        if let Ok(tr) = self.traffic.lock() {
            if tr.0 > 0 {
                tracing::info!(
                    "rank {} of {}: {} all-reduces, {:.1} MB in, {:.2} s in them (waiting for the others included)",
                    self.rank,
                    self.world,
                    tr.0,
                    tr.1 as f64 / 1e6,
                    tr.2
                );
            }
        }
        // Leaves the group, waiting a little: the engine must have forgotten this peer before a
        // later training in this process registers again (after a failure the others may be
        // gone, hence no long wait).
        if let Ok(link) = self.link.lock() {
            let broken = self.broken.load(std::sync::atomic::Ordering::SeqCst);
            if link.0.send(Job::Finish).is_ok() && self.joined && !broken {
                let _ = link.1.recv_timeout(Duration::from_secs(10));
            }
        }
    }
}

impl Peer for CollectivePeer {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), PeerError> {
        self.in_place(buf, Job::F32, |r| match r {
            Reply::F32(v) => Some(v),
            _ => None,
        })
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), PeerError> {
        self.in_place(buf, Job::F64, |r| match r {
            Reply::F64(v) => Some(v),
            _ => None,
        })
    }
}

impl CollectivePeer {
    /// Sends `buf` as `job`, puts the sum back (`take` picks the reply's values).
    fn in_place<T: Copy>(
        &self,
        buf: &mut [T],
        job: fn(Vec<T>) -> Job,
        take: fn(Reply) -> Option<Vec<T>>,
    ) -> Result<(), PeerError> {
        if self.world == 1 {
            return Ok(());
        }
        match take(self.call(job(buf.to_vec()), "an all-reduce")?) {
            Some(v) if v.len() == buf.len() => {
                buf.copy_from_slice(&v);
                Ok(())
            }
            _ => Err(self.engine_error("an all-reduce", "the result has another length".into())),
        }
    }
}

/// The peer's thread: registers, then runs each job on the engine; a panic inside the engine
/// (it panics on a lost peer) is a failed reply.
fn serve(id: PeerId, config: CollectiveConfig, jobs: &Receiver<Job>, replies: &Sender<Reply>) {
    let device = burn::tensor::Device::<Flex>::default();
    let guard = |f: &mut dyn FnMut() -> Reply| {
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Reply::Failed(panic_message(p)))
    };
    let registered = guard(&mut || match burn_collective::register::<Flex>(id, device, config.clone()) {
        Ok(()) => Reply::Done,
        Err(e) => Reply::Failed(format!("{e:?}")),
    });
    if !matches!(registered, Reply::Done) {
        let _ = replies.send(registered);
        return;
    }
    // Whoever waited may be gone (it timed out): then leave the group again at once.
    let leave = || {
        let _ = catch_unwind(AssertUnwindSafe(|| burn_collective::finish_collective::<Flex>(id)));
    };
    if replies.send(registered).is_err() {
        return leave();
    }
    while let Ok(job) = jobs.recv() {
        let reply = match job {
            Job::F32(v) => {
                let n = v.len();
                guard(&mut || {
                    reduce(id, TensorData::new(v.clone(), [n])).map_or_else(Reply::Failed, |d| {
                        d.into_vec::<f32>().map_or_else(|e| Reply::Failed(format!("{e:?}")), Reply::F32)
                    })
                })
            }
            Job::F64(v) => {
                let n = v.len();
                guard(&mut || {
                    reduce(id, TensorData::new(v.clone(), [n])).map_or_else(Reply::Failed, |d| {
                        d.into_vec::<f64>().map_or_else(|e| Reply::Failed(format!("{e:?}")), Reply::F64)
                    })
                })
            }
            Job::Finish => {
                leave();
                let _ = replies.send(Reply::Done);
                return;
            }
        };
        if replies.send(reply).is_err() {
            break;
        }
    }
    leave();
}

fn reduce(id: PeerId, data: TensorData) -> Result<TensorData, String> {
    // The data's own dtype (f64 stays f64; the default would be f32).
    let device = burn::tensor::Device::<Flex>::default();
    let t = Tensor::<Flex, 1>::from_data(data.clone(), (&device, data.dtype)).into_primitive().tensor();
    let sum =
        burn_collective::all_reduce::<Flex>(id, t, ReduceOperation::Sum).map_err(|e| format!("{e:?}"))?;
    Ok(Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(sum)).into_data())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_sum_f32_and_f64_exactly_and_repeatedly() {
        let _turn = crate::dist::TEST_ENGINE.lock().unwrap_or_else(|p| p.into_inner());
        let handles: Vec<_> = (0..2)
            .map(|r| {
                std::thread::spawn(move || {
                    let p = CollectivePeer::join(r, 2, None, Duration::from_secs(30)).unwrap();
                    assert_eq!((p.rank(), p.world()), (r, 2));
                    let mut out = Vec::new();
                    for k in 0..5 {
                        let mut a = vec![r as f32 + 0.5, k as f32, 1e-8];
                        p.all_reduce_sum(&mut a).unwrap();
                        let mut b = vec![(r as f64 + 1.0) * 1e-12, 3.0];
                        p.all_reduce_sum_f64(&mut b).unwrap();
                        out.push((a, b));
                    }
                    out
                })
            })
            .collect();
        let res: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(res[0], res[1], "every rank gets the same bits");
        for (k, (a, b)) in res[0].iter().enumerate() {
            assert_eq!(a, &vec![2.0, 2.0 * k as f32, 2e-8]);
            assert_eq!(b, &vec![3e-12, 6.0]);
        }
    }

    #[test]
    fn a_peer_whose_partner_never_comes_times_out_naming_it() {
        let _turn = crate::dist::TEST_ENGINE.lock().unwrap_or_else(|p| p.into_inner());
        let t = Instant::now();
        let err = CollectivePeer::join(0, 2, None, Duration::from_millis(300)).err().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        let msg = err.to_string();
        assert!(msg.contains("rank 1") && msg.contains("no answer"), "{msg}");
        // The late partner completes the group; the first peer's thread then leaves it.
        drop(CollectivePeer::join(1, 2, None, Duration::from_secs(30)).unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }

    #[test]
    fn coordinator_addresses_are_checked() {
        assert!(split_host_port("nohost").is_err());
        assert!(split_host_port("h:99999").is_err());
        assert_eq!(split_host_port("10.0.0.1:29500").unwrap(), ("10.0.0.1".into(), 29500));
        assert!(data_port(65535, 0).is_err());
        assert_eq!(data_port(29500, 1).unwrap(), 29502);
    }
}
