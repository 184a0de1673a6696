/*
 * simclr_plugin.h: the C ABI of simclr stage plugins, version 1.
 *
 * A plugin is a shared library (.so / .dylib / .dll) that adds stage kinds to simclr. Each kind
 * transforms one image view at a time (a `map` stage between image views, like the built-in
 * augmentations), so a pipeline uses it like any built-in kind:
 *
 *     plugins: [libposterize.so]          # relative to the pipeline file's folder
 *     stages:
 *       - { id: data, kind: synthetic_shapes, count: 500 }
 *       - { id: views, kind: views, count: 2 }
 *       - { id: post, kind: posterize, bits: 3, views: [0] }
 *
 * What a plugin exports: ONE function, SIMCLR_PLUGIN_ENTRY (`simclr_stage_plugin_v1`), which
 * returns a pointer to a static `simclr_plugin` table: the plugin's name and version, its stage
 * kinds (each with a JSON Schema of its config) and four functions (create, output_size,
 * process, destroy). The ABI's major version is part of the symbol name: an incompatible ABI
 * gets a new symbol, so simclr never calls a function it does not understand. Compatible
 * additions raise SIMCLR_PLUGIN_ABI_MINOR and append fields at the end of the table; the table
 * starts with its own size so either side can tell what the other knows.
 *
 * Rules (the host checks what it can and stops the run naming the plugin when they are broken):
 *   - The host owns every buffer. A plugin never frees or keeps a pointer it was given beyond
 *     the call, and never allocates an image the host will see.
 *   - Randomness comes only from the `seed` argument of `process` (one 64-bit value per call,
 *     derived by the host from the pipeline seed, the sample, the view and the stage id). Same
 *     seed and input, same output: that is what keeps runs reproducible for any thread count.
 *     Do not use rand(), time() or global state.
 *   - `process` is called from several threads at once on the same instance: treat the
 *     instance as read-only after `create`.
 *   - Return SIMCLR_OK (0) or an error code, with a message written into the `simclr_error`
 *     buffer (simclr_set_error does it). A failing `process` stops the run; the host reports
 *     the library, the kind and the sample.
 *   - Plugins are native code running with the user's rights. Listed as a plain path they run
 *     inside the simclr process, and a crash in a plugin is a crash of simclr. Listed as
 *     `{ path: libx.so, isolate: process, timeout_s: 10 }`, `create` and `process` run in
 *     helper processes (views exchanged through shared memory): a crash (SIGSEGV, abort), an
 *     exit or a call longer than `timeout_s` then fails the run naming the plugin, kind, stage,
 *     sample and signal, or skips the sample under the source's `on_error: skip`. Same bits
 *     either way; nothing to change in the plugin (it keeps nothing between calls but its
 *     instance). Isolation contains faults, not malice: a helper has the user's rights too, and
 *     the library is still loaded in the host to read its kinds. Load only libraries you trust.
 *
 * Building: `cc -shared -fPIC -O2 -o libmy_plugin.so my_plugin.c` with this header on the
 * include path. See plugins/README.md for a ten-minute tutorial and
 * plugins/examples/posterize/posterize.c for a complete plugin.
 */
#ifndef SIMCLR_PLUGIN_H
#define SIMCLR_PLUGIN_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Versions and the entry point ------------------------------------------------------ */

/* The major version is in the entry symbol's name; a host only looks for its own major. */
#define SIMCLR_PLUGIN_ABI_MAJOR 1
/* Compatible additions; put it in `simclr_plugin.abi_minor`. A host refuses a plugin whose
 * minor is newer than its own (the plugin may rely on something the host does not do). */
#define SIMCLR_PLUGIN_ABI_MINOR 0

/* The one symbol a plugin exports, and its name as a string (for dlsym). */
#define SIMCLR_PLUGIN_ENTRY simclr_stage_plugin_v1
#define SIMCLR_PLUGIN_ENTRY_NAME "simclr_stage_plugin_v1"

#if defined(_WIN32)
#define SIMCLR_EXPORT __declspec(dllexport)
#else
#define SIMCLR_EXPORT __attribute__((visibility("default")))
#endif

/* ---- Status codes (the return value of create, output_size and process) ---------------- */

#define SIMCLR_OK 0
/* create: the config is invalid (e.g. min > max). `simclr validate` shows the message. */
#define SIMCLR_ERR_CONFIG 1
/* output_size / process: this input cannot be processed (e.g. too small). */
#define SIMCLR_ERR_INPUT 2
/* anything else that went wrong while processing. */
#define SIMCLR_ERR_FAILED 3
/* a Rust plugin panicked; the Rust SDK catches the panic and returns this. */
#define SIMCLR_ERR_PANIC 4

/* ---- Kind flags ----------------------------------------------------------------------------- */

/* The kind modifies the view in place: `process` gets input == NULL and reads and writes
 * `output`, which holds the view. Without it, the host first asks `output_size` for the size
 * of the result, allocates that buffer, and `process` reads `input` and fills `output`. */
#define SIMCLR_KIND_IN_PLACE 1u

/* ---- Data types ---------------------------------------------------------------------------- */

/* An image view: 8-bit RGB, pixels interleaved (R G B R G B ...), rows top to bottom. */
typedef struct simclr_view {
    uint8_t *data;    /* the pixels (read-only for `input`) */
    size_t len;       /* bytes at `data`: height * stride */
    uint32_t width;   /* in pixels, >= 1 */
    uint32_t height;  /* in pixels, >= 1 */
    uint32_t stride;  /* bytes per row: width * channels in ABI 1 (rows are packed) */
    uint32_t channels; /* 3 (RGB) in ABI 1 */
    /* Output only: the host sets it to 0 before the call; the plugin sets it to the number of
     * bytes it wrote, which must be `len` (every byte of the output). The host also pre-fills
     * an out-of-place output with a canary pattern (SIMCLR_CANARY) and fails the run if any
     * 32-byte block of it (at a multiple of 32 bytes; also a last, shorter block of 16 bytes or
     * more) still holds the pattern. */
    size_t filled;
} simclr_view;

/* Repeated over an out-of-place output buffer before `process` (byte i is
 * SIMCLR_CANARY[i % 8]), to catch outputs that were not written. */
#define SIMCLR_CANARY "\xDE\xAD\xBE\xEF\xFE\xED\xFA\xCE"

/* Where a function reports what went wrong: a host buffer for a NUL-terminated UTF-8 message.
 * Write at most `capacity` bytes, NUL included; simclr_set_error below does it safely. */
typedef struct simclr_error {
    char *message;
    size_t capacity;
} simclr_error;

/* One stage kind the plugin provides. */
typedef struct simclr_kind {
    /* The `kind:` name in pipeline files: lowercase ASCII letters, digits and `_`, starting with
     * a letter, at most 64 bytes, and not the name of a built-in kind (`simclr kinds`). */
    const char *name;
    /* One line for listings, e.g. "posterizes views to fewer bits per channel". */
    const char *about;
    /* A JSON Schema (as JSON text) of the kind's config: the fields a pipeline file may give,
     * besides `id`, `kind`, `input`, `workers`, `capacity` and `views` (the host handles those).
     * The host validates every config against it before calling `create`, so `simclr validate`
     * reports mistakes as FILE:LINE:COL without running anything. Supported subset:
     *   top level: {"type": "object", "properties": {...}, "required": [...],
     *               "additionalProperties": false}
     *   a property: "type": "number" | "integer" | "string" | "boolean" | "array" | "object",
     *               "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum" (numbers),
     *               "enum": [...], "items": {schema} with "minItems"/"maxItems" (arrays),
     *               "properties"/"required"/"additionalProperties" (objects),
     *               "default" (filled in by the host when the field is missing),
     *               "description", "title" (documentation only).
     * Any other keyword makes the plugin fail to load, rather than be silently ignored. */
    const char *config_schema;
    uint32_t flags;    /* SIMCLR_KIND_* bits */
    uint32_t reserved; /* 0 */
} simclr_kind;

/* The table SIMCLR_PLUGIN_ENTRY returns. Keep it in static storage: the host reads it for as
 * long as the process lives (plugins are never unloaded). */
typedef struct simclr_plugin {
    uint32_t struct_size; /* sizeof(simclr_plugin) */
    uint32_t abi_minor;   /* SIMCLR_PLUGIN_ABI_MINOR */
    const char *name;     /* the plugin's name, e.g. "posterize" */
    const char *version;  /* its version, e.g. "1.0.0" */
    const simclr_kind *kinds; /* `kind_count` kinds (at least 1) */
    uint32_t kind_count;
    uint32_t reserved;    /* 0 */

    /* Makes an instance of kind number `kind` (an index into `kinds`) from its config.
     * `config_json` is a JSON object (`config_len` bytes, NUL-terminated as well) that already
     * passed the kind's schema, with the defaults of missing top-level fields filled in, written
     * compactly (no spaces). simclr_config_number / simclr_config_string below read it.
     * Store the instance in *instance (NULL is allowed when there is nothing to keep).
     * Called while validating (then destroyed at once, to let the plugin reject configs the
     * schema cannot express) and once per stage when the run starts. */
    int32_t (*create)(uint32_t kind, const char *config_json, size_t config_len, void **instance,
                      simclr_error *err);

    /* Out-of-place kinds only (may be NULL when every kind is in place): the width and height of
     * the output for an input of `in_width` x `in_height`. The host allocates exactly that. */
    int32_t (*output_size)(void *instance, uint32_t in_width, uint32_t in_height, uint32_t *out_width,
                           uint32_t *out_height, simclr_error *err);

    /* Processes one view with this call's `seed`.
     *   in-place kinds:     input == NULL; `output` holds the view, modify output->data.
     *   out-of-place kinds: read `input`, write all of output->data (output_size's size).
     * Either way set output->filled = output->len when done. Only output->data and
     * output->filled are read back; changes to the other fields are ignored. */
    int32_t (*process)(void *instance, uint64_t seed, const simclr_view *input, simclr_view *output,
                       simclr_error *err);

    /* Frees an instance made by `create` (never called with an instance still in use). */
    void (*destroy)(void *instance);
} simclr_plugin;

/* The entry point, as the plugin defines it:
 *     SIMCLR_EXPORT const simclr_plugin *SIMCLR_PLUGIN_ENTRY(void) { return &my_table; }   */
SIMCLR_EXPORT const simclr_plugin *SIMCLR_PLUGIN_ENTRY(void);

/* ---- Helpers (header-only; optional) ------------------------------------------------------- */

/* Writes a printf-style message into `err` (truncated to fit) and returns `code`, so a function
 * can `return simclr_set_error(err, SIMCLR_ERR_INPUT, "view %ux%u is too small", w, h);`. */
static inline int32_t simclr_set_error(simclr_error *err, int32_t code, const char *fmt, ...) {
    if (err && err->message && err->capacity > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, err->capacity, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* A small deterministic generator (SplitMix64) to turn `seed` into draws. */
typedef struct simclr_rng {
    uint64_t state;
} simclr_rng;

static inline simclr_rng simclr_rng_new(uint64_t seed) {
    simclr_rng r;
    r.state = seed;
    return r;
}

/* The next 64 random bits. */
static inline uint64_t simclr_rng_next(simclr_rng *r) {
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A uniform draw in [0, 1) (53 bits). */
static inline double simclr_rng_uniform(simclr_rng *r) {
    return (double)(simclr_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* Internal: JSON scanning for the config readers below. */
static inline const char *simclr__ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}
static inline const char *simclr__skip_string(const char *p) { /* p at the opening quote */
    p++;
    while (*p && *p != '"') {
        if (*p == '\\' && p[1]) p++;
        p++;
    }
    return *p ? p + 1 : p;
}
static inline const char *simclr__skip_value(const char *p) {
    p = simclr__ws(p);
    if (*p == '"') return simclr__skip_string(p);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (*p) {
            if (*p == '"') {
                p = simclr__skip_string(p);
                continue;
            }
            if (*p == '{' || *p == '[') depth++;
            if (*p == '}' || *p == ']') depth--;
            p++;
            if (depth == 0) break;
        }
        return p;
    }
    while (*p && *p != ',' && *p != '}' && *p != ']') p++; /* number, true, false, null */
    return p;
}
/* The value of top-level `key` in a JSON object, or NULL. */
static inline const char *simclr__find_key(const char *json, const char *key) {
    const char *p = simclr__ws(json);
    size_t klen = strlen(key);
    if (*p != '{') return NULL;
    p = simclr__ws(p + 1);
    while (*p == '"') {
        const char *k = p + 1;
        const char *end = simclr__skip_string(p);
        int match = (size_t)(end - 1 - k) == klen && strncmp(k, key, klen) == 0;
        p = simclr__ws(end);
        if (*p != ':') return NULL;
        p = simclr__ws(p + 1);
        if (match) return p;
        p = simclr__ws(simclr__skip_value(p));
        if (*p != ',') return NULL;
        p = simclr__ws(p + 1);
    }
    return NULL;
}

/* Reads the number at top-level `key` of the config (index < 0), or element `index` of the
 * array there (e.g. index 0 and 1 of `length: [3, 9]`). Returns 1 and sets *out when found. */
static inline int simclr_config_number(const char *json, const char *key, int index, double *out) {
    const char *p = simclr__find_key(json, key);
    char *end;
    double v;
    if (!p) return 0;
    if (index >= 0) {
        int i;
        if (*p != '[') return 0;
        p = simclr__ws(p + 1);
        for (i = 0; i < index; i++) {
            p = simclr__ws(simclr__skip_value(p));
            if (*p != ',') return 0;
            p = simclr__ws(p + 1);
        }
    }
    v = strtod(p, &end);
    if (end == p) return 0;
    *out = v;
    return 1;
}

/* Copies the string at top-level `key` of the config into buf (NUL-terminated, truncated to
 * `cap`; escapes other than \" and \\ are copied as written). Returns 1 when found. */
static inline int simclr_config_string(const char *json, const char *key, char *buf, size_t cap) {
    const char *p = simclr__find_key(json, key);
    size_t n = 0;
    if (!p || *p != '"' || cap == 0) return 0;
    p++;
    while (*p && *p != '"') {
        if (*p == '\\' && (p[1] == '"' || p[1] == '\\')) p++;
        if (n + 1 < cap) buf[n++] = *p;
        p++;
    }
    buf[n] = 0;
    return 1;
}

/* Reads the boolean at top-level `key`. Returns 1 and sets *out (0 or 1) when found. */
static inline int simclr_config_bool(const char *json, const char *key, int *out) {
    const char *p = simclr__find_key(json, key);
    if (!p) return 0;
    if (strncmp(p, "true", 4) == 0) {
        *out = 1;
        return 1;
    }
    if (strncmp(p, "false", 5) == 0) {
        *out = 0;
        return 1;
    }
    return 0;
}

#ifdef __cplusplus
}
#endif

#endif /* SIMCLR_PLUGIN_H */
