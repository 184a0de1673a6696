//! simclr-plugin: the stage plugin ABI of simclr and a safe Rust SDK for it.
//!
//! A plugin is a `cdylib` that adds stage kinds, each transforming one image view at a time.
//! In Rust: implement [`ViewPlugin`] for a type per kind, then export them with
//! [`export_plugin!`]:
//!
//! ```
//! use simclr_plugin::{export_plugin, ViewMut, ViewPlugin};
//!
//! /// Inverts every channel.
//! struct Invert;
//!
//! impl ViewPlugin for Invert {
//!     const KIND: &'static str = "invert";
//!     const ABOUT: &'static str = "inverts views";
//!     const SCHEMA: &'static str = r#"{"type": "object", "properties": {}, "additionalProperties": false}"#;
//!     const IN_PLACE: bool = true;
//!     fn create(_config: &serde_json::Value) -> Result<Self, String> {
//!         Ok(Invert)
//!     }
//!     fn process(&self, view: &mut ViewMut<'_>, _seed: u64) -> Result<(), String> {
//!         view.data.iter_mut().for_each(|b| *b = 255 - *b);
//!         Ok(())
//!     }
//! }
//!
//! export_plugin!(name: "invert", version: "0.1.0", kinds: [Invert]);
//! ```
//!
//! The macro defines the C entry point `simclr_stage_plugin_v1`; every call across the boundary
//! catches panics and turns them into `SIMCLR_ERR_PANIC` with the panic message, so a bug in a
//! plugin stops the run with an error instead of aborting the process. The ABI itself is in
//! [`abi`] and, for C authors, `include/simclr_plugin.h`.
//!
//! Plugins are trusted native code: they run inside the simclr process. See
//! `plugins/README.md`.

pub mod abi;
#[doc(hidden)]
pub mod export;
pub mod motion_blur;

pub use serde_json;

/// An input view: 8-bit RGB, interleaved, rows top to bottom (`width * height * 3` bytes).
#[derive(Clone, Copy, Debug)]
pub struct ViewRef<'a> {
    pub width: u32,
    pub height: u32,
    pub data: &'a [u8],
}

/// What [`ViewPlugin::process`] works on.
///
/// In-place kinds (`IN_PLACE = true`) get `input: None` and modify `data`, which holds the view.
/// Out-of-place kinds read `input` and must write every byte of `data`, a host buffer of the
/// size [`ViewPlugin::output_size`] declared.
#[derive(Debug)]
pub struct ViewMut<'a> {
    pub input: Option<ViewRef<'a>>,
    /// Size of the output in pixels.
    pub width: u32,
    pub height: u32,
    /// The output pixels, `width * height * 3` bytes.
    pub data: &'a mut [u8],
}

/// One stage kind of a plugin. An instance is made from each stage's config and then shared by
/// all worker threads (hence `Send + Sync`: keep it read-only after `create`).
pub trait ViewPlugin: Sized + Send + Sync + 'static {
    /// The `kind:` name: lowercase letters, digits and `_`, not a built-in kind's name.
    const KIND: &'static str;
    /// One line for listings.
    const ABOUT: &'static str;
    /// JSON Schema of the config (the subset listed in `simclr_plugin.h`); the host checks
    /// configs against it and fills in `default`s before calling [`create`](Self::create).
    const SCHEMA: &'static str;
    /// Whether the kind modifies the view in place (no separate output buffer).
    const IN_PLACE: bool = false;

    /// Makes an instance from a config that passed [`SCHEMA`](Self::SCHEMA). An `Err` is shown
    /// by `simclr validate` as a config error.
    fn create(config: &serde_json::Value) -> Result<Self, String>;

    /// Out-of-place kinds: the output size for an input of `width` x `height` (default: the
    /// same size).
    fn output_size(&self, width: u32, height: u32) -> Result<(u32, u32), String> {
        Ok((width, height))
    }

    /// Processes one view. All randomness must come from `seed` (see [`SeedRng`]).
    fn process(&self, view: &mut ViewMut<'_>, seed: u64) -> Result<(), String>;
}

/// SplitMix64: turns the per-call seed into draws (the same generator as `simclr_rng` in the C
/// header).
#[derive(Clone, Debug)]
pub struct SeedRng(u64);

impl SeedRng {
    pub fn new(seed: u64) -> Self {
        SeedRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) (53 bits).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
}

/// Defines the plugin's C entry point (`simclr_stage_plugin_v1`) for the given kinds:
///
/// ```ignore
/// simclr_plugin::export_plugin!(name: "my-plugin", version: env!("CARGO_PKG_VERSION"), kinds: [MyKind, Other]);
/// ```
///
/// Use it once per library, in a crate with `crate-type = ["cdylib"]`. Keep the default
/// `panic = "unwind"`: with `panic = "abort"` a panic cannot be caught and kills the process.
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, version: $version:expr, kinds: [$($kind:ty),+ $(,)?] $(,)?) => {
        /// The simclr plugin entry point (ABI 1).
        #[unsafe(no_mangle)]
        pub extern "C" fn simclr_stage_plugin_v1() -> *const $crate::abi::Plugin {
            fn kinds() -> ::std::vec::Vec<$crate::export::KindDef> {
                ::std::vec![$($crate::export::KindDef::of::<$kind>()),+]
            }
            $crate::export::entry($name, $version, kinds)
        }
    };
}
