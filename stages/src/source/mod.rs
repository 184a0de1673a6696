//! Sources: where samples come from. Each reads items by index, so reading and decoding run
//! in parallel on the workers and the runtime owns order, shuffling, limits and sharding.

use std::path::Path;

use simclr_core::Problem;

pub mod cifar;
pub mod folder;
pub mod stl10;
pub mod synthetic;

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
