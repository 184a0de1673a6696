//! simclr-stages: the built-in stage kinds.

pub mod augment;
pub mod basic;
pub mod decode;
pub mod source;

use simclr_core::Registry;

/// A registry with every built-in stage kind. Adding a kind is one line here.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register::<basic::Counter>()
        .register::<basic::Identity>()
        .register::<basic::Null>()
        .register::<basic::Fail>()
        .register::<source::cifar::Cifar10>()
        .register::<source::cifar::Cifar100>()
        .register::<source::stl10::Stl10>()
        .register::<source::folder::ImageFolder>()
        .register::<source::synthetic::SyntheticShapes>()
        .register::<decode::Decode>()
        .register::<augment::views::Views>();
    r
}
