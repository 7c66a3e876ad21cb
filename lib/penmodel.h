/* penmodel.h: the pen's firmware as a deterministic model, speaking protocol bytes.
 *
 * The model has no threads, no I/O and no clock of its own: every entry point takes now_us, a
 * monotonic time in µs on any clock the caller chooses (transport-sim reads CLOCK_MONOTONIC
 * with clock_gettime()). Time never goes back: a now_us below the last one seen is treated as the last
 * one. Physics is evaluated lazily on a fixed 1 ms grid, so the state at a given time does not
 * depend on how often the caller looks; the same config (seed included) and the same calls at
 * the same times give byte-identical replies and packets.
 *
 * Not thread-safe: the caller serializes every call (the umockdev harness holds its own lock).
 * Reference-counted so a transport and the simulator that injects faults can both hold it.
 *
 * What it models (docs/protocol.md, "The simulated pen"): motor speed following its set point
 * with a first-order lag (tau ND_PENMODEL_SPEED_TAU_MS), measured depth with small noise,
 * motor current, a handpiece thermal model warming while running, battery drain, a cartridge,
 * telemetry at its rate with consecutive sequence numbers, the heartbeat watchdog, the pen's own
 * fault backstops, and fault injection. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "protocol.h"
#include "transport.h"

typedef struct nd_penmodel nd_penmodel;

/* Dynamics (documented for tests and the daemon's interlock grace periods). */
#define ND_PENMODEL_TICK_US          1000u /* physics step */
#define ND_PENMODEL_SPEED_TAU_MS     80u   /* motor speed lag */
#define ND_PENMODEL_DEPTH_TAU_MS     15u   /* depth actuator lag */
#define ND_PENMODEL_AMBIENT_C        25.0
#define ND_PENMODEL_START_TEMPERATURE_C 28.0

/* Telemetry queue bound: samples measured but not yet sent. When a poller falls further behind
 * than this, the oldest samples are dropped (counted in samples_dropped; the host sees a gap in
 * the sequence numbers). 512 samples = 0.5 s at 1 kHz, 8 KiB of firmware RAM. */
#define ND_PENMODEL_QUEUE_MAX 512u

/* The pen's own backstops (firmware), deliberately looser than the default limits file so the
 * daemon's interlocks act first; injected faults exceed both. */
#define ND_PENMODEL_OVER_TEMPERATURE_C      45.0 /* immediate */
#define ND_PENMODEL_OVER_CURRENT_MA         1500.0
#define ND_PENMODEL_OVER_CURRENT_MS         20u
#define ND_PENMODEL_STALL_FRACTION          0.25 /* measured < fraction * set ... */
#define ND_PENMODEL_STALL_MS                500u /* ... this long, after the spin-up grace */
#define ND_PENMODEL_SPINUP_GRACE_MS         300u
#define ND_PENMODEL_DEPTH_DEVIATION_MM      0.5
#define ND_PENMODEL_DEPTH_DEVIATION_MS      100u
#define ND_PENMODEL_LOW_BATTERY_PERCENT     3u   /* latched at or below */

/* Injected faults (names as in the D-Bus Simulator.InjectFault contract). */
typedef enum nd_penmodel_fault {
        ND_PENMODEL_FAULT_OVER_TEMPERATURE,  /* "over-temperature": +10 °C/s up to +30 °C */
        ND_PENMODEL_FAULT_MOTOR_STALL,       /* "motor-stall": speed -> 5 % of set, current up */
        ND_PENMODEL_FAULT_OVER_CURRENT,      /* "over-current": current 1600 mA, running or not */
        ND_PENMODEL_FAULT_DEPTH_DEVIATION,   /* "depth-deviation": measured depth +0.6 mm */
        ND_PENMODEL_FAULT_UNRESPONSIVE,      /* "unresponsive": no control answer, no telemetry */
        ND_PENMODEL_FAULT_CORRUPT_TELEMETRY, /* "corrupt-telemetry": every packet fails to decode */
        ND_PENMODEL_FAULT_REFUSE_START,      /* "refuse-start": MOTOR_START is refused (STALL), no fault bit */
        ND_PENMODEL_FAULT_CLEAR,             /* "clear": removes every injected fault */
        _ND_PENMODEL_FAULT_MAX,
} nd_penmodel_fault;

/* The fault named s (contract name), or -EINVAL for an unknown or NULL name. */
int nd_penmodel_fault_from_string(const char *s);
/* The contract name of f; NULL when out of range. Static string. */
const char *nd_penmodel_fault_to_string(nd_penmodel_fault f);

typedef struct nd_penmodel_config {
        char serial[ND_PROTO_SERIAL_SIZE + 1];             /* 1..16 chars 0x21..0x7e */
        char model[ND_PROTO_MODEL_SIZE + 1];               /* 1..16 chars 0x20..0x7e */
        char firmware_version[ND_PROTO_FIRMWARE_SIZE + 1]; /* 1..12 chars 0x20..0x7e */
        unsigned battery_percent;   /* 0..100 at creation */
        unsigned telemetry_rate_hz; /* 1..1000: the pen's maximum and its rate after reset */
        uint64_t seed;              /* PRNG seed for every noise source */
        uint16_t depth_min_um, depth_max_um, depth_step_um;
        uint16_t speed_min_chz, speed_max_chz;
} nd_penmodel_config;

/* Fills *c with the Simulator.AddPen defaults: serial "SIM0001", model "needle-sim",
 * firmware "1.0.0", battery 100 %, 1000 Hz, seed 1, depth 0-2.5 mm step 0.05 mm,
 * speed 25-150 Hz. */
void nd_penmodel_config_init(nd_penmodel_config *c);

/* Creates a pen that powers on at now_us (device timestamps count from there), no cartridge,
 * motor stopped, not identified, watchdog disarmed at ND_PROTO_WATCHDOG_DEFAULT_MS, telemetry
 * off. Returns 0 and one reference in *ret, -EINVAL for a bad config, -ENOMEM. */
int nd_penmodel_new(const nd_penmodel_config *c, uint64_t now_us, nd_penmodel **ret);
/* Takes a reference; returns m. */
nd_penmodel *nd_penmodel_ref(nd_penmodel *m);
/* Drops a reference (frees on the last); NULL allowed; returns NULL. */
nd_penmodel *nd_penmodel_unref(nd_penmodel *m);

/* ---- Firmware entry points (protocol bytes) -------------------------------------------------- */

/* Handles one control request at now_us. For OUT requests data holds the setup->length bytes of
 * the data stage; for IN requests the reply is written to data (at most data_size bytes, never
 * more than setup->length). Returns the bytes transferred (>= 0), -EPIPE when the pen STALLs
 * (refuses: see docs/protocol.md for each request's conditions), -ETIMEDOUT when it does not
 * answer (unresponsive), -EINVAL for a caller bug (NULL, data_size too small for the OUT data). */
int nd_penmodel_control(nd_penmodel *m, uint64_t now_us, const nd_control_setup *setup, uint8_t *data,
                        size_t data_size);

/* Writes the next telemetry packet due by now_us into buf (size >= ND_PROTO_PACKET_MAX_SIZE,
 * else -ENOBUFS) and returns its length; 0 when none is due (telemetry off, unresponsive, or
 * the next sample is later). A packet carries the oldest queued samples, up to
 * ND_PROTO_SAMPLES_PER_PACKET_MAX: a poller that is late gets fuller packets and catches up;
 * call again at the same now_us to drain the queue. */
int nd_penmodel_next_packet(nd_penmodel *m, uint64_t now_us, uint8_t *buf, size_t size);

/* When next_packet will next have something: <= the last now_us seen when samples are queued
 * already, else the measuring time of the next sample; UINT64_MAX when telemetry is off or
 * the pen is unresponsive. The watchdog and physics need no timer of their own (lazy). */
uint64_t nd_penmodel_next_due_us(const nd_penmodel *m);
/* The rate the pen samples at now (SET_TELEMETRY), Hz; never 0. */
unsigned nd_penmodel_telemetry_rate_hz(const nd_penmodel *m);

/* Runs the firmware up to now_us (physics, watchdog, sampling into the queue). Every entry point
 * does this itself; call it only to look at the state at a given time. */
void nd_penmodel_advance(nd_penmodel *m, uint64_t now_us);

/* ---- Simulator controls (the hardware around the firmware) ----------------------------------- */

/* Inserts a cartridge: id 1..32 chars 0x21..0x7e, needles 1..255. -EINVAL for a bad id or
 * count, -EBUSY when one is inserted already (eject first). */
int nd_penmodel_insert_cartridge(nd_penmodel *m, uint64_t now_us, const char *id, unsigned needles);
/* Removes the cartridge (the motor stops if running). -ENOENT when there is none. */
int nd_penmodel_eject_cartridge(nd_penmodel *m, uint64_t now_us);
/* Sets the battery charge; -EINVAL above 100. */
int nd_penmodel_set_battery(nd_penmodel *m, uint64_t now_us, unsigned percent);
/* Injects a fault (several may be active at once); ND_PENMODEL_FAULT_CLEAR removes them all
 * (latched firmware fault bits stay until the host's CLEAR_FAULTS). -EINVAL when out of range. */
int nd_penmodel_inject_fault(nd_penmodel *m, uint64_t now_us, nd_penmodel_fault fault);

/* ---- Read-only view for tests and the simulator (state at the last now_us seen) --------------- */

typedef struct nd_penmodel_state {
        uint64_t now_us;              /* the model's time */
        bool identified;              /* a successful IDENTIFY since power-on */
        bool motor_running;
        double set_depth_mm, set_speed_hz;
        double speed_hz;              /* true speed (before measurement noise) */
        double depth_mm;              /* true depth (before noise and injected offset) */
        double current_ma;            /* true current */
        double temperature_c;         /* true temperature, injected heat included */
        double battery_percent;       /* exact charge (the wire carries ceil()) */
        uint8_t status;               /* ND_PROTO_STATUS_* as sent now */
        uint8_t faults;               /* latched ND_PROTO_FAULT_* */
        unsigned injected;            /* bit (1 << nd_penmodel_fault) per active injection */
        bool watchdog_armed;
        unsigned watchdog_timeout_ms;
        uint64_t watchdog_deadline_us; /* when armed */
        uint64_t last_heartbeat_us;   /* 0 when never */
        bool telemetry_enabled;
        unsigned telemetry_rate_hz;
        uint32_t next_sequence;       /* sequence number of the next sample measured */
        uint64_t samples_produced;    /* measured since power-on */
        uint64_t samples_sent;        /* handed out in packets (corrupted ones included) */
        uint64_t samples_dropped;     /* lost to the queue bound or while unresponsive */
        unsigned queued;              /* waiting in the queue */
        bool cartridge_present;
        char cartridge_id[ND_PROTO_CARTRIDGE_ID_SIZE + 1];
        unsigned cartridge_needles;
} nd_penmodel_state;

/* Copies the model's state into *ret (does not advance time). */
void nd_penmodel_get_state(const nd_penmodel *m, nd_penmodel_state *ret);
/* The configuration the model was created with (owned by the model). */
const nd_penmodel_config *nd_penmodel_get_config(const nd_penmodel *m);
