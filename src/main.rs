//! The `simclr` command line. All the work is in the library crates; this binary parses
//! arguments, prints, and maps outcomes to exit codes (0 ok, 1 runtime failure, 2 invalid
//! input, 130 interrupted).

mod cli;
mod plot;
mod render;
mod report;
mod train_bench;

pub use render::{graph_text, timestamp};

fn main() {
    std::process::exit(cli::main());
}
