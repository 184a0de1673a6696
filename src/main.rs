//! The `simclr` command line. All the work is in the library crates; this binary parses
//! arguments, prints, and maps outcomes to exit codes (0 ok, 1 runtime failure, 2 invalid
//! input, 130 interrupted).

#[cfg(not(target_env = "msvc"))]
mod alloc;
mod bench_cmd;
mod cli;
mod dist_args;
mod failure;
mod kinds_cmd;
mod load;
mod options;
mod plot;
mod plugins_cmd;
mod render;
mod report;
mod run_cmd;
mod selftest_cmd;
mod signals;
mod sweep_cmd;
mod train_bench;

pub use render::graph_text;
pub use simclr_core::run_dir::timestamp;

fn main() {
    restore_sigpipe();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(simclr_core::plugin::isolate::HOST_ARG) {
        std::process::exit(plugin_host(&args[2..]));
    }
    quiet_engine_panics();
    std::process::exit(cli::main());
}

/// burn's collective engine panics on its own runtime threads when a peer's connection drops;
/// the rank then fails with an error naming the lost ranks, so the engine's panic is one line,
/// not a backtrace. Every other panic goes to the default hook.
fn quiet_engine_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_engine = info.location().is_some_and(|l| l.file().contains("burn-collective"))
            || std::thread::current().name().is_some_and(|n| n.starts_with("tokio"));
        if in_engine {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            eprintln!("warning: the collective engine stopped: {msg}");
        } else {
            default(info);
        }
    }));
}

/// The helper process of an isolated plugin (`plugins: [{ path, isolate: process }]`): no core
/// file when the plugin crashes it (the host reports the signal); Ctrl-C and SIGTERM are the
/// host's business (it finishes its calls, then closes the pipe, which ends the helper); replies
/// go to the original stdout, the plugin's prints to stderr.
fn plugin_host(args: &[String]) -> i32 {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc calls on this process's own limits, signal dispositions and file
    // descriptors, before any other thread exists; `dup` returns a fresh descriptor owned by
    // the File built from it (checked >= 0).
    let replies = unsafe {
        let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            eprintln!("simclr {}: cannot set up its output", simclr_core::plugin::isolate::HOST_ARG);
            return 1;
        }
        std::fs::File::from_raw_fd(fd)
    };
    simclr_core::plugin::isolate::helper_main(args, replies)
}

/// Rust ignores SIGPIPE, so `println!` to a closed pipe (`simclr bench ... | head -1`) panics.
/// Like other Unix tools, end quietly instead: the reader has what it wanted.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: resets one signal's disposition to the default before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
