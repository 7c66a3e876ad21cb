/* fhir.h: needlectl export --format fhir: the ledger's sessions as an HL7 FHIR R4 Bundle (JSON,
 * type collection) of Procedure resources and the Device resources of their pens and cartridges
 * (docs/export.md has the mapping). The Bundle is written as the sessions come, page by page:
 * what stays in memory is one session's resources and 16 bytes per pen or cartridge seen. */
#pragma once

#include <json-c/json.h>
#include <stdint.h>
#include <stdio.h>

typedef struct ctl_fhir_writer ctl_fhir_writer;

/* A writer to out, or NULL when out of memory. Nothing is written until the first session. */
ctl_fhir_writer *ctl_fhir_writer_new(FILE *out);
/* Writes one GetHistory entry (as ctl_message_read_json reads it) as a Procedure entry, preceded
 * by the Device entries of its pen and cartridge when they are not yet in the Bundle. Returns 0,
 * -ENOMEM, or -EIO when out cannot be written. */
int ctl_fhir_writer_add(ctl_fhir_writer *w, json_object *session);
/* Closes the Bundle (written whole when no session was added) and flushes out: 0 or -EIO. */
int ctl_fhir_writer_finish(ctl_fhir_writer *w);
/* Frees the writer (not out); NULL is fine. */
ctl_fhir_writer *ctl_fhir_writer_free(ctl_fhir_writer *w);

/* The Procedure.status of a session's end reason (GetHistory's reason, "" while running) and
 * strokes: docs/export.md. */
const char *ctl_fhir_procedure_status(const char *reason, uint64_t end_us, uint64_t strokes);

/* A name-based (version 5, SHA-1) UUID of kind ("pen", "cartridge") and name, as 36 characters
 * of lower-case hex and dashes; the same inputs always give the same UUID. */
void ctl_fhir_device_uuid(const char *kind, const char *name, char out[static 37]);
