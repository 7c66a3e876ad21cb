/* daemon.h: needled's state, shared by the files that implement its D-Bus objects. One
 * sd-event loop; the one other thread is the ledger reader's (ledger-reader.h), which touches
 * nothing of the loop's. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "bouncer.h"
#include "contract.h"
#include "ledger.h"
#include "safety-limits.h"

#define ND_POLKIT_TIMEOUT_MS_DEFAULT 10000u
/* A person answering an authentication dialog needs longer than a machine. */
#define ND_POLKIT_INTERACTIVE_TIMEOUT_MS 120000u
/* The longest a clean shutdown waits for the pens to confirm that their motors stopped. */
#define ND_SHUTDOWN_STOP_TIMEOUT_MS 500u

typedef struct nd_daemon_options {
        bool session_bus;
        bool simulate;
        bool verbose;
        const char *limits_path;
        const char *profiles_dir;
        const char *state_dir;      /* NULL: $STATE_DIRECTORY, else ND_STATE_DIR_DEFAULT */
        unsigned polkit_timeout_ms;
        sd_event *event;            /* the loop to run on (a test harness's); NULL: a new one */
} nd_daemon_options;

typedef enum nd_limits_state {
        ND_LIMITS_OK,
        ND_LIMITS_INVALID,
        ND_LIMITS_MISSING,
} nd_limits_state;

typedef struct nd_pen nd_pen;
typedef struct nd_pen_op nd_pen_op;
typedef struct nd_daemon nd_daemon;

/* A serial seen since the daemon started, and how many times it connected (Generation). */
typedef struct nd_known_pen {
        char *serial;
        uint32_t generation;
} nd_known_pen;

struct nd_daemon {
        nd_daemon_options opts;
        char *state_dir;
        sd_event *event;
        sd_bus *bus;
        nd_bouncer *bouncer;
        sd_bus_slot *manager_slot;
        sd_bus_slot *object_manager_slot;
        sd_bus_slot *simulator_slot;
        sd_bus_slot *pen_vtable_slot;
        sd_bus_slot *pen_enumerator_slot;

        /* The limits in force (NULL when none), and what the last load said. */
        nd_limits *limits;
        nd_limits_state limits_state;
        char *limits_error;

        /* The treatment ledger; NULL when it could not be opened (Start is then refused). */
        nd_ledger *ledger;
        char *ledger_error;
        /* History and cartridge queries, on a read-only connection off the loop (ledger-reader.c);
         * NULL when the ledger is not available. */
        struct nd_ledger_reader *ledger_reader;
        char *ledger_reader_error;          /* why ledger_reader is NULL while ledger is not */
        bool cartridge_sync_logged;         /* cartridges are looked up on the loop (no reader): said once */
        uint64_t ledger_check_started_us;   /* CLOCK_MONOTONIC (ledger-state.c) */

        nd_pen **pens;            /* connected pens */
        unsigned n_pens;
        nd_pen_op *pen_ops;       /* method calls waiting for a pen's answer, all pens: few, short-lived */
        nd_known_pen *known_pens; /* every serial seen, for Generation */
        size_t n_known_pens;
        uint64_t limits_loaded_at_us; /* CLOCK_REALTIME of the load in force; 0 when none */

        struct nd_usb_context *usb;   /* NULL with --simulate, or when USB is unavailable */

        bool shutting_down;
        int exit_code;
        uint64_t shutdown_deadline_us;
};

/* Runs the daemon until SIGTERM/SIGINT; returns 0 or -errno. */
int nd_daemon_main(const nd_daemon_options *opts);

/* The kebab name of a limits state ("ok", "invalid", "missing"). */
const char *nd_limits_state_to_string(nd_limits_state s);
