//! Sources: where samples come from. Each reads items by index, so reading and decoding run
//! in parallel on the workers and the runtime owns order, shuffling, limits and sharding.

use std::path::Path;

use simclr_core::{Problem, SourceOptions};

pub mod cifar;
pub mod folder;
pub mod stl10;
pub mod synthetic;

/// Checks shared by every source's common fields.
pub fn check_common(opts: &SourceOptions, out: &mut Vec<Problem>) {
    crate::basic::check_shard(opts.shard, out);
    if opts.limit == Some(0) {
        out.push(Problem::new("limit", "`limit: 0` leaves no data", "remove `limit` or make it positive"));
    }
}

/// A problem for a path that must exist.
pub fn check_exists(field: &str, path: &Path, what: &str, out: &mut Vec<Problem>) -> bool {
    if path.exists() {
        return true;
    }
    out.push(Problem::new(
        field,
        format!("{what} `{}` does not exist", path.display()),
        "fix the path (relative paths start at the pipeline file's folder) or override it with `--set STAGE.path=DIR`",
    ));
    false
}
