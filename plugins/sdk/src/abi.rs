//! The C ABI, mirrored from `include/simclr_plugin.h` (the header is the reference for C
//! authors; `tests/header.rs` checks that both agree on every constant, size and offset).

use std::ffi::{c_char, c_void};

/// The major version: part of the entry symbol's name.
pub const ABI_MAJOR: u32 = 1;
/// Compatible additions; a host refuses a plugin whose minor is newer than its own.
pub const ABI_MINOR: u32 = 0;
/// The one symbol a plugin exports (`simclr_stage_plugin_v1`).
pub const ENTRY_SYMBOL: &str = "simclr_stage_plugin_v1";
/// The entry symbol of another major version (for a precise message when one is found).
pub fn entry_symbol(major: u32) -> String {
    format!("simclr_stage_plugin_v{major}")
}

pub const OK: i32 = 0;
/// `create`: the config is invalid.
pub const ERR_CONFIG: i32 = 1;
/// `output_size` / `process`: this input cannot be processed.
pub const ERR_INPUT: i32 = 2;
/// Anything else that went wrong while processing.
pub const ERR_FAILED: i32 = 3;
/// A Rust plugin panicked (caught by the SDK at the boundary).
pub const ERR_PANIC: i32 = 4;

/// The name of a status code, for messages.
pub fn code_name(code: i32) -> &'static str {
    match code {
        OK => "SIMCLR_OK",
        ERR_CONFIG => "SIMCLR_ERR_CONFIG",
        ERR_INPUT => "SIMCLR_ERR_INPUT",
        ERR_FAILED => "SIMCLR_ERR_FAILED",
        ERR_PANIC => "SIMCLR_ERR_PANIC",
        _ => "an unknown code",
    }
}

/// The kind modifies the view in place (`process` gets `input == NULL`).
pub const KIND_IN_PLACE: u32 = 1;
/// Every flag bit ABI 1.0 defines.
pub const KNOWN_KIND_FLAGS: u32 = KIND_IN_PLACE;

/// Pre-filled over out-of-place outputs: byte `i` is `CANARY[i % 8]`.
pub const CANARY: [u8; 8] = [0xDE, 0xAD, 0xBE, 0xEF, 0xFE, 0xED, 0xFA, 0xCE];
/// An output block of this many bytes (at a multiple of it) left equal to the canary is
/// reported as unwritten.
pub const CANARY_BLOCK: usize = 32;

/// `simclr_view`: 8-bit RGB, interleaved, rows top to bottom.
#[repr(C)]
#[derive(Debug)]
pub struct View {
    pub data: *mut u8,
    pub len: usize,
    pub width: u32,
    pub height: u32,
    pub stride: u32,
    pub channels: u32,
    /// Output only: bytes the plugin wrote (must be `len`).
    pub filled: usize,
}

/// `simclr_error`: a host buffer for a NUL-terminated UTF-8 message.
#[repr(C)]
#[derive(Debug)]
pub struct ErrorBuf {
    pub message: *mut c_char,
    pub capacity: usize,
}

/// `simclr_kind`: one stage kind.
#[repr(C)]
#[derive(Debug)]
pub struct Kind {
    pub name: *const c_char,
    pub about: *const c_char,
    pub config_schema: *const c_char,
    pub flags: u32,
    pub reserved: u32,
}

pub type CreateFn = unsafe extern "C" fn(
    kind: u32,
    config_json: *const c_char,
    config_len: usize,
    instance: *mut *mut c_void,
    err: *mut ErrorBuf,
) -> i32;
pub type OutputSizeFn = unsafe extern "C" fn(
    instance: *mut c_void,
    in_width: u32,
    in_height: u32,
    out_width: *mut u32,
    out_height: *mut u32,
    err: *mut ErrorBuf,
) -> i32;
pub type ProcessFn = unsafe extern "C" fn(
    instance: *mut c_void,
    seed: u64,
    input: *const View,
    output: *mut View,
    err: *mut ErrorBuf,
) -> i32;
pub type DestroyFn = unsafe extern "C" fn(instance: *mut c_void);

/// `simclr_plugin`: the table the entry point returns.
#[repr(C)]
#[derive(Debug)]
pub struct Plugin {
    pub struct_size: u32,
    pub abi_minor: u32,
    pub name: *const c_char,
    pub version: *const c_char,
    pub kinds: *const Kind,
    pub kind_count: u32,
    pub reserved: u32,
    pub create: Option<CreateFn>,
    pub output_size: Option<OutputSizeFn>,
    pub process: Option<ProcessFn>,
    pub destroy: Option<DestroyFn>,
}

/// The entry point's type.
pub type EntryFn = unsafe extern "C" fn() -> *const Plugin;

/// Bytes of the table a host of ABI 1.0 reads: a plugin's `struct_size` must be at least this.
pub const PLUGIN_SIZE_V1_0: usize = std::mem::size_of::<Plugin>();

/// Every field of the C structs with its offset, and every constant, for the header test.
pub fn layout() -> Vec<(&'static str, &'static str, usize)> {
    use std::mem::{offset_of, size_of};
    macro_rules! fields {
        ($c:literal, $t:ty, [$($f:ident),*]) => {
            vec![("sizeof", $c, size_of::<$t>()), $(($c, stringify!($f), offset_of!($t, $f))),*]
        };
    }
    let mut v = fields!("simclr_view", View, [data, len, width, height, stride, channels, filled]);
    v.extend(fields!("simclr_error", ErrorBuf, [message, capacity]));
    v.extend(fields!("simclr_kind", Kind, [name, about, config_schema, flags, reserved]));
    v.extend(fields!(
        "simclr_plugin",
        Plugin,
        [
            struct_size,
            abi_minor,
            name,
            version,
            kinds,
            kind_count,
            reserved,
            create,
            output_size,
            process,
            destroy
        ]
    ));
    v
}

/// The header's integer constants and their Rust values.
pub fn constants() -> Vec<(&'static str, i64)> {
    vec![
        ("SIMCLR_PLUGIN_ABI_MAJOR", ABI_MAJOR.into()),
        ("SIMCLR_PLUGIN_ABI_MINOR", ABI_MINOR.into()),
        ("SIMCLR_OK", OK.into()),
        ("SIMCLR_ERR_CONFIG", ERR_CONFIG.into()),
        ("SIMCLR_ERR_INPUT", ERR_INPUT.into()),
        ("SIMCLR_ERR_FAILED", ERR_FAILED.into()),
        ("SIMCLR_ERR_PANIC", ERR_PANIC.into()),
        ("SIMCLR_KIND_IN_PLACE", KIND_IN_PLACE.into()),
    ]
}
