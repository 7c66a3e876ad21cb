/* fhir.c: the FHIR R4 Bundle of needlectl export --format fhir (fhir.h; the mapping is in
 * docs/export.md). Every resource is built as a json-c object and serialized by json-c; only the
 * Bundle's fixed envelope around the entries is written as constant text, so that the entries can
 * stream out as the pages of history come in. */
#include <errno.h>
#include <inttypes.h>
#include <nettle/sha1.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "bus-util.h"
#include "fhir.h"

/* The namespace of needled's name-based device UUIDs (RFC 9562 section 5.5): a random UUID,
 * chosen once for this purpose; changing it changes every Device's fullUrl. */
static const uint8_t device_namespace[16] = {
        0x86, 0x35, 0xc2, 0xe1, 0xdb, 0xde, 0x41, 0x61, 0x9c, 0xf5, 0x68, 0x2c, 0x5a, 0x38, 0x87, 0x03,
};

#define DATA_ABSENT_REASON_URL "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
/* RFC 3986 URIs as identifier values (FHIR's convention for a urn:uuid identifier). */
#define URI_SYSTEM "urn:ietf:rfc:3986"

/* A set of 16-byte UUIDs (open addressing, linear probing): the devices already in the Bundle. */
typedef struct uuid_set {
        uint8_t (*slots)[16];   /* all-zero: empty (a version 5 UUID is never all zero) */
        size_t size;            /* a power of two */
        size_t used;
} uuid_set;

struct ctl_fhir_writer {
        FILE *out;
        bool started;           /* the envelope and at least one entry written */
        uuid_set devices;
};

static size_t uuid_hash(const uint8_t u[16]) {
        uint64_t h;
        memcpy(&h, u, sizeof h); /* SHA-1 output: already uniformly spread */
        return (size_t) h;
}

static int uuid_set_grow(uuid_set *s) {
        size_t size = s->size ? s->size * 2 : 64;
        uint8_t (*slots)[16] = calloc(size, sizeof *slots);
        if (!slots)
                return -ENOMEM;
        static const uint8_t zero[16];
        for (size_t i = 0; i < s->size; i++) {
                if (memcmp(s->slots[i], zero, 16) == 0)
                        continue;
                size_t j = uuid_hash(s->slots[i]) & (size - 1);
                while (memcmp(slots[j], zero, 16) != 0)
                        j = (j + 1) & (size - 1);
                memcpy(slots[j], s->slots[i], 16);
        }
        free(s->slots);
        s->slots = slots;
        s->size = size;
        return 0;
}

/* Adds u: 1 when it was new, 0 when already there, -ENOMEM. */
static int uuid_set_add(uuid_set *s, const uint8_t u[16]) {
        static const uint8_t zero[16];
        if ((s->used + 1) * 2 > s->size) {
                int r = uuid_set_grow(s);
                if (r < 0)
                        return r;
        }
        size_t j = uuid_hash(u) & (s->size - 1);
        while (memcmp(s->slots[j], zero, 16) != 0) {
                if (memcmp(s->slots[j], u, 16) == 0)
                        return 0;
                j = (j + 1) & (s->size - 1);
        }
        memcpy(s->slots[j], u, 16);
        s->used++;
        return 1;
}

static void device_uuid_bytes(const char *kind, const char *name, uint8_t u[16]) {
        struct sha1_ctx ctx;
        uint8_t digest[SHA1_DIGEST_SIZE];
        sha1_init(&ctx);
        sha1_update(&ctx, sizeof device_namespace, device_namespace);
        /* "pen:SERIAL", "cartridge:ID": a kind never contains ':', so no two inputs collide. */
        sha1_update(&ctx, strlen(kind), (const uint8_t *) kind);
        sha1_update(&ctx, 1, (const uint8_t *) ":");
        sha1_update(&ctx, strlen(name), (const uint8_t *) name);
        sha1_digest(&ctx, sizeof digest, digest);
        memcpy(u, digest, 16);
        u[6] = (uint8_t) ((u[6] & 0x0f) | 0x50); /* version 5 */
        u[8] = (uint8_t) ((u[8] & 0x3f) | 0x80); /* the RFC's variant */
}

static void uuid_format(const uint8_t u[16], char out[static 37]) {
        snprintf(out, 37,
                 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                 u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

void ctl_fhir_device_uuid(const char *kind, const char *name, char out[static 37]) {
        uint8_t u[16];
        device_uuid_bytes(kind, name, u);
        uuid_format(u, out);
}

/* The end reasons of the contract (SessionEnded) and their Procedure.status. */
static const struct {
        const char *reason;     /* a prefix when it ends in ':' */
        const char *status;
} status_map[] = {
        /* Normal ends: the profile's duration ran out, the operator stopped it, the area's
         * puncture density cap was reached. */
        { "completed",             "completed" },
        { "stopped",               "completed" },
        { "dose-reached",          "completed" },
        /* Ended by something other than the operator after the treatment had begun. */
        { "fault:",                "stopped" },
        { "client-vanished",       "stopped" },
        { "client-heartbeat-lost", "stopped" },
        { "device-lost",           "stopped" },
        { "limits-changed",        "stopped" },
        { "daemon-restart",        "stopped" },
};

const char *ctl_fhir_procedure_status(const char *reason, uint64_t end_us, uint64_t strokes) {
        if (end_us == 0)
                return "in-progress";
        /* Not one needle stroke: nothing beyond preparation took place, whatever ended it. */
        if (strokes == 0)
                return "not-done";
        for (size_t i = 0; i < ELEMENTSOF(status_map); i++) {
                size_t n = strlen(status_map[i].reason);
                bool prefix = status_map[i].reason[n - 1] == ':';
                if (prefix ? strncmp(reason, status_map[i].reason, n) == 0 && reason[n]
                           : STREQ(reason, status_map[i].reason))
                        return status_map[i].status;
        }
        return "unknown"; /* a reason this needlectl does not know (a newer daemon) */
}

/* json-c helpers: each returns NULL when out of memory, freeing what it was given. */
static json_object *obj_add(json_object *o, const char *key, json_object *v) {
        if (!o || !v || json_object_object_add(o, key, v) < 0) {
                json_object_put(o);
                json_object_put(v);
                return NULL;
        }
        return o;
}

static json_object *arr_add(json_object *a, json_object *v) {
        if (!a || !v || json_object_array_add(a, v) < 0) {
                json_object_put(a);
                json_object_put(v);
                return NULL;
        }
        return a;
}

static json_object *str(const char *s) {
        return json_object_new_string(s);
}

/* {"text": text} (a CodeableConcept, or an Annotation) */
static json_object *text_object(const char *text) {
        return obj_add(json_object_new_object(), "text", str(text));
}

static json_object *note_printf(const char *format, ...) _printf_(1, 2);
static json_object *note_printf(const char *format, ...) {
        _cleanup_free_ char *text = NULL;
        va_list ap;
        va_start(ap, format);
        int n = vasprintf(&text, format, ap);
        va_end(ap);
        return n < 0 ? NULL : text_object(text);
}

static json_object *entry_new(const char *uuid, json_object *resource) {
        char url[64];
        snprintf(url, sizeof url, "urn:uuid:%s", uuid);
        json_object *e = obj_add(json_object_new_object(), "fullUrl", str(url));
        return obj_add(e, "resource", resource);
}

static int write_entry(ctl_fhir_writer *w, json_object *entry) {
        const char *text = json_object_to_json_string_ext(entry, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!text)
                return -ENOMEM;
        if (!w->started) {
                /* The envelope: fixed text (no data in it); "entry" only with an entry, as FHIR's
                 * JSON forbids empty arrays. */
                if (fputs("{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[\n", w->out) < 0)
                        return -EIO;
                w->started = true;
        } else if (fputs(",\n", w->out) < 0)
                return -EIO;
        return fputs(text, w->out) < 0 ? -EIO : 0;
}

static json_object *pen_device(const char *serial) {
        json_object *d = obj_add(json_object_new_object(), "resourceType", str("Device"));
        d = obj_add(d, "serialNumber", str(serial));
        return obj_add(d, "type", text_object("automated microneedling pen"));
}

static json_object *cartridge_device(const char *id, int64_t needles) {
        json_object *d = obj_add(json_object_new_object(), "resourceType", str("Device"));
        d = obj_add(d, "serialNumber", str(id));
        d = obj_add(d, "type", text_object("microneedle cartridge"));
        if (needles > 0) {
                json_object *q = obj_add(json_object_new_object(), "value", json_object_new_int64(needles));
                q = obj_add(q, "unit", str("needles"));
                json_object *p = obj_add(json_object_new_object(), "type", text_object("needle count"));
                p = obj_add(p, "valueQuantity", arr_add(json_object_new_array(), q));
                d = obj_add(d, "property", arr_add(json_object_new_array(), p));
        }
        return d;
}

/* Writes the Device entry of kind/name unless it is in the Bundle already; *ret_ref gets its
 * Reference ({"reference": "urn:uuid:...", "display": ...}). */
static int add_device(ctl_fhir_writer *w, const char *kind, const char *name, int64_t needles,
                      json_object **ret_ref) {
        uint8_t u[16];
        char uuid[37], url[64], display[512];
        device_uuid_bytes(kind, name, u);
        uuid_format(u, uuid);
        int r = uuid_set_add(&w->devices, u);
        if (r < 0)
                return r;
        if (r > 0) {
                json_object *d = STREQ(kind, "pen") ? pen_device(name) : cartridge_device(name, needles);
                _cleanup_json_ json_object *entry = entry_new(uuid, d);
                if (!entry)
                        return -ENOMEM;
                r = write_entry(w, entry);
                if (r < 0)
                        return r;
        }
        snprintf(url, sizeof url, "urn:uuid:%s", uuid);
        snprintf(display, sizeof display, "%s %s", kind, name);
        json_object *ref = obj_add(json_object_new_object(), "reference", str(url));
        *ret_ref = obj_add(ref, "display", str(display));
        return *ret_ref ? 0 : -ENOMEM;
}

static json_object *identifier(const char *system, const char *type_text, const char *value) {
        json_object *id = json_object_new_object();
        if (system)
                id = obj_add(id, "system", str(system));
        if (type_text)
                id = obj_add(id, "type", text_object(type_text));
        return obj_add(id, "value", str(value));
}

static json_object *procedure(json_object *s, json_object *pen_ref, json_object *cartridge_ref) {
        const char *reason = ctl_json_str(s, "reason");
        uint64_t start = (uint64_t) ctl_json_int(s, "start"), end = (uint64_t) ctl_json_int(s, "end");
        uint64_t strokes = (uint64_t) ctl_json_int(s, "strokes");
        const char *status = ctl_fhir_procedure_status(reason, end, strokes);
        const char *label = ctl_json_str(s, "label"), *area = ctl_json_str(s, "area");
        const char *skin = ctl_json_str(s, "skin_type");
        char session_urn[128], t[64];

        json_object *p = obj_add(json_object_new_object(), "resourceType", str("Procedure"));

        snprintf(session_urn, sizeof session_urn, "urn:uuid:%s", ctl_json_str(s, "id"));
        json_object *ids = arr_add(json_object_new_array(), identifier(URI_SYSTEM, NULL, session_urn));
        if (label[0])
                ids = arr_add(ids, identifier(NULL, "needled session label", label));
        p = obj_add(p, "identifier", ids);

        p = obj_add(p, "status", str(status));
        if (end != 0 && !STREQ(status, "completed"))
                p = obj_add(p, "statusReason", text_object(reason[0] ? reason : "unknown"));
        {
                _cleanup_free_ char *code = NULL;
                if (asprintf(&code, "microneedling (needled profile %s)", ctl_json_str(s, "profile")) < 0) {
                        json_object_put(p);
                        return NULL;
                }
                p = obj_add(p, "code", text_object(code));
        }
        /* needled records no patient (the label is the clinic software's reference): subject is
         * required, so it says why it is absent. */
        json_object *dar = obj_add(json_object_new_object(), "url", str(DATA_ABSENT_REASON_URL));
        dar = obj_add(dar, "valueCode", str("unsupported"));
        json_object *subject = obj_add(json_object_new_object(), "type", str("Patient"));
        subject = obj_add(subject, "extension", arr_add(json_object_new_array(), dar));
        p = obj_add(p, "subject", subject);

        json_object *period = obj_add(json_object_new_object(), "start", str(ctl_format_iso_utc(start, t, sizeof t)));
        if (end != 0)
                period = obj_add(period, "end", str(ctl_format_iso_utc(end, t, sizeof t)));
        p = obj_add(p, "performedPeriod", period);

        if (area[0])
                p = obj_add(p, "bodySite", arr_add(json_object_new_array(), text_object(area)));
        if (end != 0)
                p = obj_add(p, "outcome", text_object(reason[0] ? reason : "unknown"));

        json_object *notes = json_object_new_array();
        notes = arr_add(notes, note_printf("profile: %s", ctl_json_str(s, "profile")));
        notes = arr_add(notes, note_printf("profile-sha256: %s", ctl_json_str(s, "profile_digest")));
        notes = arr_add(notes, note_printf("limits-sha256: %s", ctl_json_str(s, "limits_digest")));
        notes = arr_add(notes, note_printf("skin-type: %s", skin[0] ? skin : "not given"));
        int64_t punctures = ctl_json_int(s, "punctures");
        if (punctures == 0 && strokes > 0) /* a row from before the ledger recorded the dose (schema 1) */
                notes = arr_add(notes, note_printf("punctures: not recorded (%" PRIu64 " strokes x %" PRId64 " needles)",
                                                   strokes, ctl_json_int(s, "needles")));
        else
                notes = arr_add(notes, note_printf("punctures: %" PRId64 " (%" PRIu64 " strokes x %" PRId64 " needles)",
                                                   punctures, strokes, ctl_json_int(s, "needles")));
        if (ctl_json_double(s, "area_cm2") > 0)
                notes = arr_add(notes, note_printf("density: %.1f punctures/cm2 over %.2f cm2",
                                                   ctl_json_double(s, "density_per_cm2"), ctl_json_double(s, "area_cm2")));
        else
                notes = arr_add(notes, note_printf("density: not known (the profile gave no treated surface)"));
        notes = arr_add(notes, note_printf("figures: duration %.3f s, max depth %.3f mm, max speed %.1f Hz, "
                                           "max temperature %.1f C, max current %.1f mA",
                                           ctl_json_double(s, "duration_s"), ctl_json_double(s, "max_depth_mm"),
                                           ctl_json_double(s, "max_speed_hz"), ctl_json_double(s, "max_temperature_c"),
                                           ctl_json_double(s, "max_current_ma")));
        notes = arr_add(notes, note_printf("end-reason: %s", end != 0 ? reason : "(running)"));
        p = obj_add(p, "note", notes);

        json_object *used = arr_add(json_object_new_array(), json_object_get(pen_ref));
        if (cartridge_ref)
                used = arr_add(used, json_object_get(cartridge_ref));
        return obj_add(p, "usedReference", used);
}

ctl_fhir_writer *ctl_fhir_writer_new(FILE *out) {
        ctl_fhir_writer *w = calloc(1, sizeof *w);
        if (w)
                w->out = out;
        return w;
}

int ctl_fhir_writer_add(ctl_fhir_writer *w, json_object *session) {
        _cleanup_json_ json_object *pen_ref = NULL, *cartridge_ref = NULL, *entry = NULL;
        const char *cartridge = ctl_json_str(session, "cartridge");
        int r = add_device(w, "pen", ctl_json_str(session, "pen"), 0, &pen_ref);
        if (r >= 0 && cartridge[0])
                r = add_device(w, "cartridge", cartridge, ctl_json_int(session, "needles"), &cartridge_ref);
        if (r < 0)
                return r;
        entry = entry_new(ctl_json_str(session, "id"), procedure(session, pen_ref, cartridge_ref));
        if (!entry)
                return -ENOMEM;
        return write_entry(w, entry);
}

int ctl_fhir_writer_finish(ctl_fhir_writer *w) {
        const char *tail = w->started ? "\n]}\n" : "{\"resourceType\":\"Bundle\",\"type\":\"collection\"}\n";
        if (fputs(tail, w->out) < 0 || fflush(w->out) != 0 || ferror(w->out))
                return -EIO;
        return 0;
}

ctl_fhir_writer *ctl_fhir_writer_free(ctl_fhir_writer *w) {
        if (w) {
                free(w->devices.slots);
                free(w);
        }
        return NULL;
}
