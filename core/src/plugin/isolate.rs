//! Process-isolated plugins (`plugins: [{ path: ..., isolate: process, timeout_s: 10 }]`).
//!
//! The kind's `create` and `process` run in helper processes (the `simclr` executable started
//! as `simclr __plugin-host`), never in the host: a plugin that crashes (SIGSEGV, abort),
//! exits, or hangs past `timeout_s` costs one helper, which is killed and replaced, and the
//! sample fails as a data error (the run stops naming plugin, kind, stage, sample and what
//! happened, or the source's `on_error: skip` skips the sample). The library is still loaded
//! in the host to read its kinds and schemas (its initializers run there).
//!
//! Exchange: each helper has a file on `/dev/shm` (tmpfs: memory, never a disk; the
//! temporary folder where there is none), unlinked once both sides opened it. The host writes
//! a view's pixels at offset 0 and a 24-byte request on the helper's stdin (seed, width,
//! height, byte length); the helper runs the in-process code path on it (same checks, same
//! seed, so the same bits), writes the output pixels at offset 0 and answers on its stdout
//! (status, width, height, message length, then the message on failure). Helpers are pooled:
//! one per worker thread at most, each serving one call at a time.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};

use crate::error::StageError;
use crate::sample::{Image, Sample};
use crate::stage::{MapStage, SampleCtx};

use super::stage::{create_instance, each_view, view_failed, PluginStage};
use super::{load, LoadedPlugin};

/// The environment variable naming the helper executable (default: this executable).
pub const HOST_VAR: &str = "SIMCLR_PLUGIN_HOST";
/// The hidden subcommand a helper is started with.
pub const HOST_ARG: &str = "__plugin-host";

/// How a plugin's kinds are isolated.
#[derive(Clone, Debug, PartialEq)]
pub struct Isolation {
    pub timeout: Duration,
}

/// A reply frame: status (0 ok / ready, 1 failed), width, height, message length.
struct Reply {
    status: u32,
    width: u32,
    height: u32,
    message: String,
}

/// Longest message a reply carries (longer ones are cut by the helper).
const MAX_MESSAGE: usize = 1 << 16;

fn read_reply(r: &mut impl Read) -> std::io::Result<Reply> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head)?;
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let len = word(12) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other("a malformed reply"));
    }
    let mut msg = vec![0u8; len];
    r.read_exact(&mut msg)?;
    Ok(Reply {
        status: word(0),
        width: word(4),
        height: word(8),
        message: String::from_utf8_lossy(&msg).into_owned(),
    })
}

fn write_reply(
    w: &mut impl Write,
    status: u32,
    width: u32,
    height: u32,
    message: &str,
) -> std::io::Result<()> {
    let msg = &message.as_bytes()[..message.len().min(MAX_MESSAGE)];
    let mut frame = Vec::with_capacity(16 + msg.len());
    for x in [status, width, height, msg.len() as u32] {
        frame.extend_from_slice(&x.to_le_bytes());
    }
    frame.extend_from_slice(msg);
    w.write_all(&frame)?;
    w.flush()
}

/// One helper process: its stdin, the shared file, and its replies (read by a thread, so that
/// waiting for one can time out).
struct Helper {
    child: Child,
    stdin: ChildStdin,
    shm: File,
    replies: Receiver<std::io::Result<Reply>>,
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing stdin ends a healthy helper; a stuck one is killed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What went wrong with a helper, for the sample's error message.
enum Failure {
    /// The plugin's own error (the in-process message).
    Plugin(String),
    /// The helper died, hung or could not be talked to.
    Helper(String),
}

static SHM_COUNTER: AtomicU64 = AtomicU64::new(0);

fn shm_dir() -> PathBuf {
    let dev_shm = PathBuf::from("/dev/shm");
    if dev_shm.is_dir() {
        dev_shm
    } else {
        std::env::temp_dir()
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        31 => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    format!("{name} (signal {sig})")
}

impl Helper {
    fn spawn(plugin: &LoadedPlugin, kind: &str, config: &str) -> Result<Helper, String> {
        let exe = match std::env::var_os(HOST_VAR) {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe().map_err(|e| format!("cannot find the simclr executable: {e}"))?,
        };
        let n = SHM_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = shm_dir().join(format!("simclr-plugin-{}-{n}", std::process::id()));
        let shm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let spawned = Command::new(&exe)
            .arg(HOST_ARG)
            .arg(&plugin.path)
            .arg(kind)
            .arg(config)
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C meant for simclr does not kill the helpers in
            // the middle of a call (simclr finishes its calls, then closes their pipes).
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(format!(
                    "cannot start the helper {} ({e}); set {HOST_VAR} to the simclr executable",
                    exe.display()
                ));
            }
        };
        let (Some(stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = std::fs::remove_file(&path);
            return Err("the helper has no pipes".into());
        };
        let (tx, replies) = bounded(1);
        let reader = std::thread::Builder::new().name("plugin-helper".into()).spawn(move || loop {
            let r = read_reply(&mut stdout);
            let end = r.is_err();
            if tx.send(r).is_err() || end {
                return;
            }
        });
        let mut helper = Helper { child, stdin, shm, replies };
        if let Err(e) = reader {
            let _ = std::fs::remove_file(&path);
            return Err(format!("cannot start a thread: {e}")); // (dropping `helper` kills it)
        }
        // The handshake: the helper loaded the plugin and made the instance (or says why not).
        let ready = helper.reply(Duration::from_secs(60));
        let _ = std::fs::remove_file(&path);
        match ready {
            Ok(r) if r.status == 0 => Ok(helper),
            Ok(r) => Err(r.message),
            Err(Failure::Plugin(m) | Failure::Helper(m)) => Err(format!(
                "the helper {} did not start: {m} (is {HOST_VAR} the simclr executable?)",
                exe.display()
            )),
        }
    }

    /// Waits for the next reply; a dead or stuck helper is described.
    fn reply(&mut self, timeout: Duration) -> Result<Reply, Failure> {
        match self.replies.recv_timeout(timeout) {
            Ok(Ok(r)) => Ok(r),
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                Err(Failure::Helper(format!(
                    "did not return within timeout_s = {} s (the helper was killed)",
                    timeout.as_secs_f64()
                )))
            }
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => Err(Failure::Helper(self.death())),
        }
    }

    /// How the helper ended (killed if it still runs a moment after closing its output).
    fn death(&mut self) -> String {
        use std::os::unix::process::ExitStatusExt;
        for _ in 0..100 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return "closed its output and stopped answering (the helper was killed)".into();
        }
        match self.child.wait() {
            Ok(s) => match (s.signal(), s.code()) {
                (Some(sig), _) => format!("crashed with {}", signal_name(sig)),
                (None, Some(code)) => format!("exited with code {code} in the middle of a call"),
                (None, None) => "ended".into(),
            },
            Err(e) => format!("stopped answering ({e})"),
        }
    }

    fn call(&mut self, img: &mut Image, seed: u64, timeout: Duration) -> Result<(), Failure> {
        let io = |e: std::io::Error| Failure::Helper(format!("cannot exchange a view with the helper: {e}"));
        // A helper that died while idle (e.g. killed for memory): writing to its pipe would
        // raise SIGPIPE in simclr.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return Err(Failure::Helper(self.death()));
        }
        self.shm.write_all_at(&img.data, 0).map_err(io)?;
        let mut req = [0u8; 24];
        req[..8].copy_from_slice(&seed.to_le_bytes());
        req[8..12].copy_from_slice(&img.width.to_le_bytes());
        req[12..16].copy_from_slice(&img.height.to_le_bytes());
        req[16..].copy_from_slice(&(img.data.len() as u64).to_le_bytes());
        if self.stdin.write_all(&req).and_then(|()| self.stdin.flush()).is_err() {
            return Err(Failure::Helper(self.death()));
        }
        let r = self.reply(timeout)?;
        if r.status != 0 {
            return Err(Failure::Plugin(r.message));
        }
        let pixels = u64::from(r.width) * u64::from(r.height);
        if r.width > super::MAX_SIDE || r.height > super::MAX_SIDE || pixels > super::MAX_OUTPUT_PIXELS {
            return Err(Failure::Helper(format!(
                "answered an output of {}x{} (out of bounds)",
                r.width, r.height
            )));
        }
        let mut data = vec![0u8; pixels as usize * 3];
        self.shm.read_exact_at(&mut data, 0).map_err(io)?;
        *img = Image { width: r.width, height: r.height, data };
        Ok(())
    }
}

/// A plugin kind whose calls run in helper processes.
pub(super) struct IsolatedStage {
    pub(super) plugin: Arc<LoadedPlugin>,
    pub(super) kind: String,
    pub(super) config: String,
    pub(super) views: Option<Vec<u32>>,
    pub(super) isolation: Isolation,
    /// Idle helpers.
    pool: Mutex<Vec<Helper>>,
}

impl IsolatedStage {
    /// Starts one helper at once, so that a plugin refusing its config, or a helper that cannot
    /// start, fails the run before any data flows.
    pub(super) fn new(
        plugin: Arc<LoadedPlugin>,
        kind: String,
        config: String,
        views: Option<Vec<u32>>,
        isolation: Isolation,
    ) -> Result<Self, String> {
        let first = Helper::spawn(&plugin, &kind, &config)?;
        Ok(IsolatedStage { plugin, kind, config, views, isolation, pool: Mutex::new(vec![first]) })
    }

    /// An idle, live helper, or a new one (an idle helper can end without a call failing, e.g.
    /// killed for memory).
    fn take(&self) -> Result<Helper, String> {
        loop {
            let idle = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(mut h) = idle else { return Helper::spawn(&self.plugin, &self.kind, &self.config) };
            if matches!(h.child.try_wait(), Ok(None)) {
                return Ok(h);
            } // else dropped: reaped
        }
    }
}

impl MapStage for IsolatedStage {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        let (name, kind) = (&self.plugin.file_name, &self.kind);
        each_view(sample, self.views.as_deref(), ctx, |v, img, seed| {
            let mut helper = self
                .take()
                .map_err(|e| StageError::fatal(format!("plugin '{name}' (kind '{kind}', isolated): {e}")))?;
            match helper.call(img, seed, self.isolation.timeout) {
                Ok(()) => {
                    self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(helper);
                    Ok(())
                }
                // The helper is fine: the plugin refused this view, as in-process.
                Err(Failure::Plugin(m)) => {
                    self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(helper);
                    Err(view_failed(name, kind, ctx.index, v, &m))
                }
                // The helper is dropped (killed); the next call starts another.
                Err(Failure::Helper(m)) => Err(StageError::data(format!(
                    "plugin '{name}' (kind '{kind}', isolated) {m} on sample {}, view {v}",
                    ctx.index
                ))),
            }
        })
    }
}

/// `simclr __plugin-host LIBRARY KIND CONFIG SHM`: the helper's side, answering on `replies`
/// (the process's original stdout: the caller points fd 1 elsewhere, so that what the plugin
/// prints cannot corrupt the replies). Returns the exit code.
pub fn helper_main(args: &[String], replies: File) -> i32 {
    let [lib, kind, config, shm] = args else {
        eprintln!("usage: simclr {HOST_ARG} LIBRARY KIND CONFIG SHM (started by simclr itself)");
        return 2;
    };
    let mut out = std::io::BufWriter::new(replies);
    let setup = (|| {
        let plugin = load(std::path::Path::new(lib)).map_err(|e| format!("{}: {}", lib, e.problem))?;
        let k = plugin
            .kinds
            .iter()
            .position(|k| &k.name == kind)
            .ok_or_else(|| format!("{lib} has no kind `{kind}`"))?;
        let instance = create_instance(&plugin, k, config)
            .map_err(|e| format!("plugin '{}' could not make a `{kind}`: {e}", plugin.file_name))?;
        let shm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(shm)
            .map_err(|e| format!("cannot open {shm}: {e}"))?;
        Ok::<_, String>((PluginStage::new(plugin.clone(), k, instance), shm))
    })();
    let (stage, shm) = match setup {
        Ok(s) => s,
        Err(m) => {
            let _ = write_reply(&mut out, 1, 0, 0, &m);
            return 1;
        }
    };
    if write_reply(&mut out, 0, 0, 0, "").is_err() {
        return 1;
    }
    let mut stdin = std::io::stdin().lock();
    let mut req = [0u8; 24];
    loop {
        if stdin.read_exact(&mut req).is_err() {
            return 0; // The host closed the pipe: done.
        }
        let u64_at = |i: usize| u64::from_le_bytes(req[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(req[i..i + 4].try_into().unwrap_or([0; 4]));
        let (seed, width, height, len) = (u64_at(0), u32_at(8), u32_at(12), u64_at(16));
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let result = shm
            .read_exact_at(&mut data, 0)
            .map_err(|e| format!("cannot read the view: {e}"))
            .and_then(|()| {
                let mut img = Image { width, height, data };
                stage.process(&mut img, seed)?;
                shm.write_all_at(&img.data, 0).map_err(|e| format!("cannot write the output: {e}"))?;
                Ok((img.width, img.height))
            });
        let sent = match result {
            Ok((w, h)) => write_reply(&mut out, 0, w, h, ""),
            Err(m) => write_reply(&mut out, 1, 0, 0, &m),
        };
        if sent.is_err() {
            return 1;
        }
    }
}
