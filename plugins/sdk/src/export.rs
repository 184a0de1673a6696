//! What [`export_plugin!`](crate::export_plugin) expands to: the C functions of the table, each
//! catching panics at the boundary.

use std::any::Any;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use crate::abi::{self, ErrorBuf, View};
use crate::{ViewMut, ViewPlugin, ViewRef};

/// A kind with its type erased.
trait Erased: Send + Sync {
    fn in_place(&self) -> bool;
    fn output_size(&self, width: u32, height: u32) -> Result<(u32, u32), String>;
    fn process(&self, view: &mut ViewMut<'_>, seed: u64) -> Result<(), String>;
}

impl<P: ViewPlugin> Erased for P {
    fn in_place(&self) -> bool {
        P::IN_PLACE
    }
    fn output_size(&self, width: u32, height: u32) -> Result<(u32, u32), String> {
        ViewPlugin::output_size(self, width, height)
    }
    fn process(&self, view: &mut ViewMut<'_>, seed: u64) -> Result<(), String> {
        ViewPlugin::process(self, view, seed)
    }
}

type Instance = Box<dyn Erased>;

/// One kind as the export table needs it.
pub struct KindDef {
    kind: &'static str,
    about: &'static str,
    schema: &'static str,
    in_place: bool,
    create: fn(&serde_json::Value) -> Result<Instance, String>,
}

impl KindDef {
    pub fn of<P: ViewPlugin>() -> Self {
        fn create<P: ViewPlugin>(config: &serde_json::Value) -> Result<Instance, String> {
            Ok(Box::new(P::create(config)?))
        }
        KindDef {
            kind: P::KIND,
            about: P::ABOUT,
            schema: P::SCHEMA,
            in_place: P::IN_PLACE,
            create: create::<P>,
        }
    }
}

struct Exported {
    table: abi::Plugin,
    defs: Vec<KindDef>,
    _kinds: Vec<abi::Kind>,
    _strings: Vec<CString>,
}

// SAFETY: the raw pointers point into `_kinds` and `_strings`, which live (unchanged) as long
// as the static does.
unsafe impl Send for Exported {}
// SAFETY: as for Send: nothing is ever written through those pointers.
unsafe impl Sync for Exported {}

static EXPORTED: OnceLock<Exported> = OnceLock::new();

fn cstring(s: &str) -> CString {
    // A NUL inside a name would cut it short; the host then rejects the (changed) name.
    CString::new(s.replace('\0', "?")).unwrap_or_default()
}

fn build(name: &str, version: &str, defs: Vec<KindDef>) -> Exported {
    let mut strings = Vec::new();
    let mut ptr = |s: &str| {
        let c = cstring(s);
        let p = c.as_ptr();
        strings.push(c);
        p
    };
    let name = ptr(name);
    let version = ptr(version);
    let kinds: Vec<abi::Kind> = defs
        .iter()
        .map(|d| abi::Kind {
            name: ptr(d.kind),
            about: ptr(d.about),
            config_schema: ptr(d.schema),
            flags: if d.in_place { abi::KIND_IN_PLACE } else { 0 },
            reserved: 0,
        })
        .collect();
    let table = abi::Plugin {
        struct_size: std::mem::size_of::<abi::Plugin>() as u32,
        abi_minor: abi::ABI_MINOR,
        name,
        version,
        kinds: kinds.as_ptr(),
        kind_count: kinds.len() as u32,
        reserved: 0,
        create: Some(create),
        output_size: Some(output_size),
        process: Some(process),
        destroy: Some(destroy),
    };
    Exported { table, defs, _kinds: kinds, _strings: strings }
}

/// The body of the entry point: builds the table once.
pub fn entry(name: &str, version: &str, kinds: fn() -> Vec<KindDef>) -> *const abi::Plugin {
    let built = catch_unwind(AssertUnwindSafe(|| {
        let e = EXPORTED.get_or_init(|| build(name, version, kinds()));
        &e.table as *const abi::Plugin
    }));
    built.unwrap_or_else(|payload| {
        drop_quietly(payload);
        std::ptr::null()
    })
}

/// Writes `msg` into the host's error buffer, truncated at a character boundary.
///
/// # Safety
/// `err` is null or points to a valid `simclr_error` whose buffer holds `capacity` bytes.
unsafe fn write_error(err: *mut ErrorBuf, msg: &str) {
    // SAFETY: the caller's contract: null or a valid `simclr_error`.
    let Some(err) = (unsafe { err.as_ref() }) else { return };
    if err.message.is_null() || err.capacity == 0 {
        return;
    }
    let mut n = msg.len().min(err.capacity - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: the buffer holds `capacity` bytes (caller's contract) and `n + 1 <= capacity`;
    // `msg` has at least `n` bytes and is not the host's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err.message as *mut u8, n);
        *err.message.add(n) = 0;
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Drops a panic payload; a payload whose `drop` panics again is leaked instead of unwinding
/// into C.
fn drop_quietly(payload: Box<dyn Any + Send>) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
}

/// Runs `f`, turning an `Err((code, message))` or a panic into a status code and message.
fn guard(err: *mut ErrorBuf, f: impl FnOnce() -> Result<(), (i32, String)>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => abi::OK,
        Ok(Err((code, msg))) => {
            // SAFETY: `err` is the host's error argument: null or valid, by the ABI.
            unsafe { write_error(err, &msg) };
            code
        }
        Err(payload) => {
            let msg = format!("the plugin panicked: {}", panic_message(&*payload));
            drop_quietly(payload);
            // SAFETY: as above.
            unsafe { write_error(err, &msg) };
            abi::ERR_PANIC
        }
    }
}

fn failed(msg: impl Into<String>) -> (i32, String) {
    (abi::ERR_FAILED, msg.into())
}

unsafe extern "C" fn create(
    kind: u32,
    config_json: *const c_char,
    config_len: usize,
    instance: *mut *mut c_void,
    err: *mut ErrorBuf,
) -> i32 {
    guard(err, || {
        let exported = EXPORTED.get().ok_or_else(|| failed("create called before the entry point"))?;
        let def =
            exported.defs.get(kind as usize).ok_or_else(|| (abi::ERR_CONFIG, format!("no kind #{kind}")))?;
        if config_json.is_null() || instance.is_null() {
            return Err(failed("create called with a null pointer"));
        }
        // SAFETY: non-null (checked); by the ABI, `config_len` readable bytes of JSON.
        let bytes = unsafe { std::slice::from_raw_parts(config_json as *const u8, config_len) };
        let config: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| (abi::ERR_CONFIG, format!("the config is not valid JSON: {e}")))?;
        let made = (def.create)(&config).map_err(|m| (abi::ERR_CONFIG, m))?;
        // SAFETY: non-null (checked); by the ABI, a writable out-pointer.
        unsafe { *instance = Box::into_raw(Box::new(made)) as *mut c_void };
        Ok(())
    })
}

/// # Safety
/// `instance` was made by `create` and not destroyed.
unsafe fn instance<'a>(instance: *mut c_void) -> Result<&'a Instance, (i32, String)> {
    // SAFETY: the caller's contract: null or made by `create` (a boxed `Instance`) and alive.
    unsafe { (instance as *const Instance).as_ref() }.ok_or_else(|| failed("null instance"))
}

unsafe extern "C" fn output_size(
    inst: *mut c_void,
    in_width: u32,
    in_height: u32,
    out_width: *mut u32,
    out_height: *mut u32,
    err: *mut ErrorBuf,
) -> i32 {
    guard(err, || {
        // SAFETY: the host passes an instance from `create`, not yet destroyed (the ABI).
        let inst = unsafe { instance(inst)? };
        if out_width.is_null() || out_height.is_null() {
            return Err(failed("output_size called with a null pointer"));
        }
        let (w, h) = inst.output_size(in_width, in_height).map_err(|m| (abi::ERR_INPUT, m))?;
        // SAFETY: both non-null (checked); by the ABI, writable out-pointers.
        unsafe {
            *out_width = w;
            *out_height = h;
        }
        Ok(())
    })
}

fn check_view(v: &View, what: &str) -> Result<(), (i32, String)> {
    let expected = v.width as usize * v.height as usize * 3;
    if v.data.is_null() || v.channels != 3 || v.stride as usize != v.width as usize * 3 || v.len != expected {
        return Err(failed(format!(
            "the {what} view is malformed ({}x{}, {} channels, stride {}, {} bytes)",
            v.width, v.height, v.channels, v.stride, v.len
        )));
    }
    Ok(())
}

unsafe extern "C" fn process(
    inst: *mut c_void,
    seed: u64,
    input: *const View,
    output: *mut View,
    err: *mut ErrorBuf,
) -> i32 {
    guard(err, || {
        // SAFETY: the host passes an instance from `create`, not yet destroyed (the ABI).
        let inst = unsafe { instance(inst)? };
        // SAFETY: null or, by the ABI, a valid view descriptor owned by the host for the call.
        let out = unsafe { output.as_mut() }.ok_or_else(|| failed("null output view"))?;
        check_view(out, "output")?;
        // SAFETY: as for `output`.
        let input = match unsafe { input.as_ref() } {
            Some(i) => {
                check_view(i, "input")?;
                // SAFETY: `check_view` checked non-null data and a length matching the size;
                // by the ABI the host's input buffer is readable for the call.
                let data = unsafe { std::slice::from_raw_parts(i.data as *const u8, i.len) };
                Some(ViewRef { width: i.width, height: i.height, data })
            }
            None => None,
        };
        if inst.in_place() != input.is_none() {
            return Err(failed(
                "the host passed an input view to an in-place kind, or none to an out-of-place one",
            ));
        }
        // SAFETY: checked like the input; by the ABI the output buffer is writable, ours alone
        // for the call, and distinct from the input's.
        let data = unsafe { std::slice::from_raw_parts_mut(out.data, out.len) };
        let mut view = ViewMut { input, width: out.width, height: out.height, data };
        inst.process(&mut view, seed).map_err(failed)?;
        out.filled = out.len;
        Ok(())
    })
}

unsafe extern "C" fn destroy(inst: *mut c_void) {
    if inst.is_null() {
        return;
    }
    // SAFETY: non-null; by the ABI made by `create` (`Box::into_raw`) and destroyed once.
    let boxed = unsafe { Box::from_raw(inst as *mut Instance) };
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(boxed))) {
        drop_quietly(payload);
    }
}
