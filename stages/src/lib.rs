//! simclr-stages: the built-in stage kinds.

pub mod augment;
pub mod basic;

use simclr_core::Registry;

/// A registry with every built-in stage kind. Adding a kind is one line here.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register::<basic::Counter>()
        .register::<basic::Identity>()
        .register::<basic::Null>()
        .register::<basic::Fail>()
        .register::<augment::views::Views>();
    r
}
