/* test-fhir.c: tools/fhir.c on its own: every end reason of the contract (SessionEnded) and its
 * Procedure.status (the table of docs/export.md), the name-based device UUIDs against Python's
 * uuid.uuid5 of the same namespace and names, and the writer: an empty Bundle, and each device
 * once however many sessions use it. */
#include <check.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check-main.h"
#include "fhir.h"

START_TEST(test_status_of_every_reason) {
        static const struct {
                const char *reason;
                const char *status;
        } cases[] = {
                { "completed", "completed" },           { "stopped", "completed" },
                { "dose-reached", "completed" },        { "fault:over-temperature", "stopped" },
                { "fault:heartbeat-lost", "stopped" },  { "client-vanished", "stopped" },
                { "client-heartbeat-lost", "stopped" }, { "device-lost", "stopped" },
                { "limits-changed", "stopped" },        { "daemon-restart", "stopped" },
                /* not of the contract: a newer daemon's, or malformed */
                { "fault:", "unknown" },                { "something-new", "unknown" },
                { "", "unknown" },                      { "completed-ish", "unknown" },
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
                ck_assert_msg(strcmp(ctl_fhir_procedure_status(cases[i].reason, 2, 10), cases[i].status) == 0,
                              "%s: %s", cases[i].reason, ctl_fhir_procedure_status(cases[i].reason, 2, 10));
        /* Running: in progress whatever the reason; ended without a stroke: not done. */
        ck_assert_str_eq(ctl_fhir_procedure_status("", 0, 5), "in-progress");
        ck_assert_str_eq(ctl_fhir_procedure_status("stopped", 2, 0), "not-done");
        ck_assert_str_eq(ctl_fhir_procedure_status("fault:motor-stall", 2, 0), "not-done");
}
END_TEST

START_TEST(test_device_uuids) {
        char u[37];
        /* python3 -c "import uuid; print(uuid.uuid5(uuid.UUID('8635c2e1-dbde-4161-9cf5-682c5a388703'), 'pen:NP-0001'))" */
        ctl_fhir_device_uuid("pen", "NP-0001", u);
        ck_assert_str_eq(u, "d0305f08-1e8c-5b9d-a037-d3a4dd4dc37e");
        ctl_fhir_device_uuid("cartridge", "CART-0000000001", u);
        ck_assert_str_eq(u, "28616d84-edc7-5538-80bd-8bba9ec6576f");
}
END_TEST

static char *write_bundle(json_object **sessions, size_t n) {
        char *text = NULL;
        size_t size = 0;
        FILE *f = open_memstream(&text, &size);
        ck_assert_ptr_nonnull(f);
        ctl_fhir_writer *w = ctl_fhir_writer_new(f);
        ck_assert_ptr_nonnull(w);
        for (size_t i = 0; i < n; i++)
                ck_assert_int_eq(ctl_fhir_writer_add(w, sessions[i]), 0);
        ck_assert_int_eq(ctl_fhir_writer_finish(w), 0);
        ctl_fhir_writer_free(w);
        fclose(f);
        return text;
}

START_TEST(test_writer) {
        char *text = write_bundle(NULL, 0);
        ck_assert_str_eq(text, "{\"resourceType\":\"Bundle\",\"type\":\"collection\"}\n");
        free(text);

        /* 300 sessions on 3 pens, each cartridge used by 2: 3 + 150 devices, each once. */
        json_object *sessions[300];
        for (size_t i = 0; i < 300; i++) {
                char id[64], pen[32], cart[32];
                snprintf(id, sizeof id, "00000000-0000-4000-8000-%012zu", i);
                snprintf(pen, sizeof pen, "PEN-%zu", i % 3);
                snprintf(cart, sizeof cart, "C-%zu", i / 2);
                json_object *s = json_object_new_object();
                json_object_object_add(s, "id", json_object_new_string(id));
                json_object_object_add(s, "pen", json_object_new_string(pen));
                json_object_object_add(s, "cartridge", json_object_new_string(cart));
                json_object_object_add(s, "needles", json_object_new_int64(12));
                json_object_object_add(s, "start", json_object_new_int64(1700000000000000 + (int64_t) i));
                json_object_object_add(s, "end", json_object_new_int64(1700000001000000 + (int64_t) i));
                json_object_object_add(s, "strokes", json_object_new_int64(10));
                json_object_object_add(s, "reason", json_object_new_string("stopped"));
                json_object_object_add(s, "label", json_object_new_string(i % 2 ? "a \"label\"\n" : ""));
                sessions[i] = s;
        }
        text = write_bundle(sessions, 300);
        json_object *bundle = json_tokener_parse(text);
        ck_assert_ptr_nonnull(bundle);
        json_object *entries = json_object_object_get(bundle, "entry");
        ck_assert_int_eq((int) json_object_array_length(entries), 300 + 3 + 150);
        size_t devices = 0, procedures = 0;
        for (size_t i = 0; i < json_object_array_length(entries); i++) {
                json_object *r = json_object_object_get(json_object_array_get_idx(entries, i), "resource");
                const char *type = json_object_get_string(json_object_object_get(r, "resourceType"));
                if (strcmp(type, "Device") == 0)
                        devices++;
                else if (strcmp(type, "Procedure") == 0)
                        procedures++;
        }
        ck_assert_uint_eq(devices, 153);
        ck_assert_uint_eq(procedures, 300);
        /* pen 0, cartridge 0, session 0, pen 1 (cartridge 0 already there), session 1. */
        json_object *p = json_object_object_get(json_object_array_get_idx(entries, 2), "resource");
        json_object *ids = json_object_object_get(p, "identifier");
        ck_assert_int_eq((int) json_object_array_length(ids), 1); /* no label: no label identifier */
        ck_assert_str_eq(json_object_get_string(json_object_object_get(json_object_array_get_idx(ids, 0), "value")),
                         "urn:uuid:00000000-0000-4000-8000-000000000000");
        /* The label went through json-c: quotes and line breaks escaped, read back intact. */
        p = json_object_object_get(json_object_array_get_idx(entries, 4), "resource");
        ids = json_object_object_get(p, "identifier");
        ck_assert_str_eq(json_object_get_string(json_object_object_get(json_object_array_get_idx(ids, 1), "value")),
                         "a \"label\"\n");
        json_object *used = json_object_object_get(p, "usedReference");
        ck_assert_str_eq(json_object_get_string(json_object_object_get(json_object_array_get_idx(used, 1), "reference")),
                         json_object_get_string(json_object_object_get(json_object_array_get_idx(entries, 1), "fullUrl")));
        json_object_put(bundle);
        free(text);
        for (size_t i = 0; i < 300; i++)
                json_object_put(sessions[i]);
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("fhir");
        TCase *tc = tcase_create("fhir");
        tcase_add_test(tc, test_status_of_every_reason);
        tcase_add_test(tc, test_device_uuids);
        tcase_add_test(tc, test_writer);
        suite_add_tcase(s, tc);
        return s;
}
