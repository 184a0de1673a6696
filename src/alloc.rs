//! The binary's memory allocator: jemalloc, told never to give freed pages back to the kernel.
//!
//! A training step allocates and frees gigabytes in blocks of tens of megabytes (every
//! activation, every gradient; 67 MB for one ResNet-18 CIFAR layer at 256 images). glibc serves
//! blocks that large with their own `mmap` and returns them with `munmap` on free (its mmap
//! threshold cannot be raised past 32 MB), so each step faulted its whole working set in again,
//! page by page: 11-16% of a ResNet-18 step's CPU time went to the kernel's page faults.
//! jemalloc with `dirty_decay_ms:-1` keeps freed pages mapped and reuses them (the working set
//! repeats every step, so the process does not grow past its peak); with any finite decay it
//! purges pages a step still needs and is slower than glibc. Measured in BENCHMARKS.md
//! ("Intel host, round 4"). `_RJEM_MALLOC_CONF` in the environment overrides these options.
//!
//! The Python extension and the library crates keep their host's allocator.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads this symbol (`const char *malloc_conf`, prefixed in tikv's build) once, at
/// its initialization.
#[used]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static, NUL-terminated C string.
    Some(unsafe { &*c"dirty_decay_ms:-1,muzzy_decay_ms:-1".as_ptr() });
