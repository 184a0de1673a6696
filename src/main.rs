//! The `simclr` command line. All the work is in the library crates; this binary parses
//! arguments, prints, and maps outcomes to exit codes (0 ok, 1 runtime failure, 2 invalid
//! input, 130 interrupted).

mod bench_cmd;
mod cli;
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
    tune_malloc();
    std::process::exit(cli::main());
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

/// With glibc's defaults every buffer over 128 KB (a decoded image, each view, each view's
/// tensor: 0.15-0.6 MB, several per image) is its own `mmap`, faulted in page by page and
/// unmapped on free, and the heap is trimmed back whenever its free top passes 128 KB. Keeping
/// blocks under 64 MB on the heap and trimming only past 256 MB removes that churn: ~10% more
/// images/s on the ImageNet augmentation benchmark (BENCHMARKS.md), the same output.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; it is called before any other thread
    // exists, and a rejected value (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
