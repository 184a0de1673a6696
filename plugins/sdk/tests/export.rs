//! The export macro, called in-process through the C table as a host would: panics and errors
//! come back as codes with messages.

use std::ffi::{c_char, c_void, CStr};

use simclr_plugin::abi::{self, ErrorBuf, View};
use simclr_plugin::{export_plugin, ViewMut, ViewPlugin};

/// Adds `add` to every byte, in place; panics when the seed is 13, fails when it is 14.
struct AddInPlace {
    add: u8,
}

impl ViewPlugin for AddInPlace {
    const KIND: &'static str = "add_in_place";
    const ABOUT: &'static str = "adds a constant";
    const SCHEMA: &'static str = r#"{"type": "object", "properties": {"add": {"type": "integer"}}}"#;
    const IN_PLACE: bool = true;
    fn create(config: &serde_json::Value) -> Result<Self, String> {
        let add = config["add"].as_u64().ok_or("`add` is missing")?;
        Ok(AddInPlace { add: add as u8 })
    }
    fn process(&self, view: &mut ViewMut<'_>, seed: u64) -> Result<(), String> {
        match seed {
            13 => panic!("unlucky seed"),
            14 => return Err("seed 14 is not supported".into()),
            _ => {}
        }
        view.data.iter_mut().for_each(|b| *b = b.wrapping_add(self.add));
        Ok(())
    }
}

/// Doubles the width (out of place).
struct Widen;

impl ViewPlugin for Widen {
    const KIND: &'static str = "widen";
    const ABOUT: &'static str = "doubles the width";
    const SCHEMA: &'static str = r#"{"type": "object"}"#;
    fn create(_: &serde_json::Value) -> Result<Self, String> {
        Ok(Widen)
    }
    fn output_size(&self, w: u32, h: u32) -> Result<(u32, u32), String> {
        Ok((w * 2, h))
    }
    fn process(&self, view: &mut ViewMut<'_>, _seed: u64) -> Result<(), String> {
        let input = view.input.ok_or("no input")?;
        let w = input.width as usize * 3;
        for (out, row) in view.data.chunks_exact_mut(w * 2).zip(input.data.chunks_exact(w)) {
            out[..w].copy_from_slice(row);
            out[w..].copy_from_slice(row);
        }
        Ok(())
    }
}

export_plugin!(name: "test-plugin", version: "1.2.3", kinds: [AddInPlace, Widen]);

fn s(p: *const c_char) -> String {
    // SAFETY: a name from the plugin's static table: non-NULL, NUL-terminated.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn view(data: &mut [u8], w: u32, h: u32) -> View {
    View {
        data: data.as_mut_ptr(),
        len: data.len(),
        width: w,
        height: h,
        stride: w * 3,
        channels: 3,
        filled: 0,
    }
}

#[test]
fn table_describes_the_plugin_and_calls_are_contained() {
    // SAFETY: the entry point returns a pointer to the plugin's static table.
    let t = unsafe { &*simclr_stage_plugin_v1() };
    assert_eq!(t.struct_size as usize, std::mem::size_of::<abi::Plugin>());
    assert_eq!(t.abi_minor, abi::ABI_MINOR);
    assert_eq!((s(t.name), s(t.version)), ("test-plugin".into(), "1.2.3".into()));
    // SAFETY: `kind_count` descriptors at `kinds`, in the static table.
    let kinds = unsafe { std::slice::from_raw_parts(t.kinds, t.kind_count as usize) };
    assert_eq!(kinds.len(), 2);
    assert_eq!((s(kinds[0].name), kinds[0].flags), ("add_in_place".into(), abi::KIND_IN_PLACE));
    assert_eq!((s(kinds[1].name), kinds[1].flags), ("widen".into(), 0));
    let (create, process, destroy) = (t.create.unwrap(), t.process.unwrap(), t.destroy.unwrap());

    let mut msg = [0u8; 64];
    let mut err = ErrorBuf { message: msg.as_mut_ptr() as *mut c_char, capacity: msg.len() };
    let mut inst: *mut c_void = std::ptr::null_mut();
    let cfg = r#"{"add":2}"#;
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    let rc = unsafe { create(0, cfg.as_ptr() as *const c_char, cfg.len(), &mut inst, &mut err) };
    assert_eq!(rc, abi::OK);

    let mut px = vec![1u8, 2, 3, 4, 5, 6];
    let mut v = view(&mut px, 2, 1);
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    assert_eq!(unsafe { process(inst, 1, std::ptr::null(), &mut v, &mut err) }, abi::OK);
    assert_eq!(v.filled, 6);
    assert_eq!(px, [3, 4, 5, 6, 7, 8]);

    // A panic is caught at the boundary and reported.
    let mut v = view(&mut px, 2, 1);
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    assert_eq!(unsafe { process(inst, 13, std::ptr::null(), &mut v, &mut err) }, abi::ERR_PANIC);
    let m = CStr::from_bytes_until_nul(&msg).unwrap().to_string_lossy().into_owned();
    assert!(m.contains("panicked") && m.contains("unlucky seed"), "{m}");
    assert_eq!(v.filled, 0);

    // An Err is an error code with its message, truncated to the buffer.
    let mut small = [0u8; 8];
    let mut err_small = ErrorBuf { message: small.as_mut_ptr() as *mut c_char, capacity: small.len() };
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    assert_eq!(unsafe { process(inst, 14, std::ptr::null(), &mut v, &mut err_small) }, abi::ERR_FAILED);
    assert_eq!(CStr::from_bytes_until_nul(&small).unwrap().to_str().unwrap(), "seed 14");

    // Bad configs are config errors.
    let mut bad: *mut c_void = std::ptr::null_mut();
    let cfg = r#"{}"#;
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    let rc = unsafe { create(0, cfg.as_ptr() as *const c_char, cfg.len(), &mut bad, &mut err) };
    assert_eq!(rc, abi::ERR_CONFIG);
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    let rc = unsafe { create(7, cfg.as_ptr() as *const c_char, cfg.len(), &mut bad, &mut err) };
    assert_eq!(rc, abi::ERR_CONFIG);
    assert!(bad.is_null());
    // SAFETY: an instance from `create`, destroyed once.
    unsafe { destroy(inst) };

    // Out of place: the declared size, then the host buffer.
    let mut wide: *mut c_void = std::ptr::null_mut();
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    let rc = unsafe { create(1, "{}".as_ptr() as *const c_char, 2, &mut wide, &mut err) };
    assert_eq!(rc, abi::OK);
    let (mut ow, mut oh) = (0, 0);
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    assert_eq!(unsafe { (t.output_size.unwrap())(wide, 2, 1, &mut ow, &mut oh, &mut err) }, abi::OK);
    assert_eq!((ow, oh), (4, 1));
    let mut src = vec![1u8, 2, 3, 4, 5, 6];
    let mut out = vec![0u8; 12];
    let input = view(&mut src, 2, 1);
    let mut o = view(&mut out, 4, 1);
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    assert_eq!(unsafe { process(wide, 0, &input, &mut o, &mut err) }, abi::OK);
    assert_eq!(o.filled, 12);
    assert_eq!(out, [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]);
    // An in-place call to an out-of-place kind is refused, not crashed on.
    let mut o = view(&mut out, 4, 1);
    // SAFETY: a table function called as the ABI says: an instance from `create` (or none), and pointers to live locals of the stated sizes.
    assert_eq!(unsafe { process(wide, 0, std::ptr::null(), &mut o, &mut err) }, abi::ERR_FAILED);
    // SAFETY: an instance from `create`, destroyed once.
    unsafe { destroy(wide) };
}
