//! simclr-stages: the built-in stage kinds.

pub mod augment;
pub mod basic;
pub mod decode;
mod jpeg_reader;
pub mod report;
pub mod source;
pub mod tensor;

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
        .register::<augment::views::Views>()
        .register::<tensor::ToTensor>()
        .register::<tensor::BatchConfig>()
        .register::<augment::crop::RandomResizedCrop>()
        .register::<augment::flip::HorizontalFlip>()
        .register::<augment::color::ColorDistort>()
        .register::<augment::color::ColorJitter>()
        .register::<augment::color::RandomGrayscale>()
        .register::<augment::blur::GaussianBlur>()
        .register::<augment::cutout::Cutout>()
        .register::<augment::sobel::Sobel>()
        .register::<augment::noise::GaussianNoise>()
        .register::<augment::rotate::Rotate>()
        .register::<augment::tone::Solarize>()
        .register::<augment::tone::Equalize>()
        .register::<augment::motion_blur::MotionBlurBuiltin>();
    r
}
