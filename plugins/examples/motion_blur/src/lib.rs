//! An example simclr stage plugin in Rust: `motion_blur`, a directional blur with a random
//! length and angle per view (something the built-in kinds lack).
//!
//! Build: `cargo build --release -p motion-blur-plugin` makes
//! `target/release/libmotion_blur_plugin.so`; then
//! `SIMCLR_PLUGIN_PATH=target/release simclr bench pipelines/plugin-motion-blur.yaml`.
//!
//! The algorithm lives in `simclr_plugin::motion_blur` so the built-in `motion_blur_builtin`
//! runs the same code (the plugin-overhead benchmark compares the two).

use simclr_plugin::motion_blur::{self, Params};
use simclr_plugin::{export_plugin, ViewMut, ViewPlugin};

/// The `motion_blur` kind: out of place (a blur reads neighbours, so it writes into the host's
/// output buffer, the same size as the input).
struct MotionBlur {
    params: Params,
}

impl ViewPlugin for MotionBlur {
    const KIND: &'static str = "motion_blur";
    const ABOUT: &'static str =
        "directional blur: length ~ U(length) px, angle ~ U(angle) deg, with probability p";
    const SCHEMA: &'static str = motion_blur::SCHEMA;

    fn create(config: &simclr_plugin::serde_json::Value) -> Result<Self, String> {
        // The host already checked the schema (types, ranges) and filled in defaults; this adds
        // what a schema cannot say (min <= max).
        Ok(MotionBlur { params: Params::from_json(config)? })
    }

    fn process(&self, view: &mut ViewMut<'_>, seed: u64) -> Result<(), String> {
        let input = view.input.ok_or("motion_blur is out of place: no input view")?;
        motion_blur::apply(
            &self.params,
            seed,
            input.data,
            input.width as usize,
            input.height as usize,
            view.data,
        );
        Ok(())
    }
}

export_plugin!(name: "motion-blur", version: env!("CARGO_PKG_VERSION"), kinds: [MotionBlur]);
