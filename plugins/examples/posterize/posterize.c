/*
 * posterize: an example simclr stage plugin in C.
 *
 * Kind `posterize` keeps the `bits` most significant bits of every channel (PIL's
 * ImageOps.posterize), with probability `p` per view. It works in place.
 *
 *   make                      # or: cc -shared -fPIC -O2 -I../../sdk/include -o libposterize.so posterize.c
 *   SIMCLR_PLUGIN_PATH=plugins/examples/posterize simclr bench pipelines/plugin-posterize.yaml
 */
#include <stdlib.h>

#include "simclr_plugin.h"

/* What `create` keeps: read-only afterwards, so every thread can use it at once. */
typedef struct posterize {
    unsigned bits;
    double p;
} posterize;

static int32_t create(uint32_t kind, const char *config_json, size_t config_len, void **instance,
                      simclr_error *err) {
    double bits = 4, p = 1;
    posterize *self;
    (void)kind; /* one kind only */
    (void)config_len;
    /* The host already checked the config against the schema below and filled in defaults. */
    simclr_config_number(config_json, "bits", -1, &bits);
    simclr_config_number(config_json, "p", -1, &p);
    self = malloc(sizeof *self);
    if (!self) return simclr_set_error(err, SIMCLR_ERR_FAILED, "out of memory");
    self->bits = (unsigned)bits;
    self->p = p;
    *instance = self;
    return SIMCLR_OK;
}

static int32_t process(void *instance, uint64_t seed, const simclr_view *input, simclr_view *output,
                       simclr_error *err) {
    const posterize *self = instance;
    simclr_rng rng = simclr_rng_new(seed);
    uint8_t mask = (uint8_t)(0xFFu << (8 - self->bits));
    size_t i;
    (void)input; /* in place: NULL */
    (void)err;
    if (simclr_rng_uniform(&rng) < self->p) {
        for (i = 0; i < output->len; i++) output->data[i] &= mask;
    }
    output->filled = output->len;
    return SIMCLR_OK;
}

static void destroy(void *instance) { free(instance); }

static const simclr_kind kinds[] = {{
    "posterize",
    "keeps the `bits` high bits of each channel (PIL posterize), with probability p",
    "{\"type\": \"object\", \"additionalProperties\": false, \"properties\": {"
    "\"bits\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 8, \"default\": 4,"
    " \"description\": \"bits kept per channel\"},"
    "\"p\": {\"type\": \"number\", \"minimum\": 0, \"maximum\": 1, \"default\": 1,"
    " \"description\": \"probability per view\"}}}",
    SIMCLR_KIND_IN_PLACE,
    0,
}};

static const simclr_plugin table = {
    sizeof(simclr_plugin),
    SIMCLR_PLUGIN_ABI_MINOR,
    "posterize",
    "1.0.0",
    kinds,
    sizeof kinds / sizeof kinds[0],
    0,
    create,
    NULL, /* output_size: every kind is in place */
    process,
    destroy,
};

SIMCLR_EXPORT const simclr_plugin *SIMCLR_PLUGIN_ENTRY(void) { return &table; }
