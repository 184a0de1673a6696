//! Evaluation: frozen-encoder features, linear probes, kNN, and the baselines (random init,
//! supervised) from the same backbone (the paper's section 5 protocols).

pub mod features;
pub mod fine_tune;
mod fine_tune_run;
pub mod knn;
pub mod linear;
pub mod stages;
pub mod subset;
pub mod supervised;

/// Registers the evaluation stage kinds.
pub fn register(registry: &mut simclr_core::Registry) {
    registry.register::<stages::RandomInit>();
    registry.register::<stages::LinearEval>();
    registry.register::<stages::KnnEval>();
    registry.register::<stages::ExtractFeatures>();
    registry.register::<supervised::SupervisedTrain>();
    registry.register::<fine_tune::FineTune>();
}
