/* needle-gadget-core.h: the pen of needle-gadget without FunctionFS: the pen model behind ep0
 * requests and the interrupt IN endpoint, the motor log, hostile packets and the control
 * commands. No I/O and no clock of its own (every call takes now_us, CLOCK_MONOTONIC µs), so a
 * unit test drives it with made-up times; tools/needle-gadget.c adds FunctionFS, the socket and
 * the event loop. Not thread-safe. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "penmodel.h"
#include "transport.h"

typedef struct ng_gadget ng_gadget;

/* Why the motor stopped (the motor log's cause=...). */
typedef enum ng_stop_cause {
        NG_STOP_HOST,      /* MOTOR_STOP from the host */
        NG_STOP_WATCHDOG,  /* the heartbeat watchdog expired */
        NG_STOP_FAULT,     /* a firmware backstop latched a fault bit */
        NG_STOP_CARTRIDGE, /* the cartridge was ejected while running */
        NG_STOP_UNBIND,    /* the USB connection went away (disable, unbind, bus reset) */
        NG_STOP_EXIT,      /* needle-gadget is exiting */
        _NG_STOP_MAX,
} ng_stop_cause;

/* "host", "watchdog", ...; NULL when out of range. Static string. */
const char *ng_stop_cause_to_string(ng_stop_cause c);

/* Hostile interrupt IN packets (control command "hostile KIND [COUNT]"). */
typedef enum ng_hostile {
        NG_HOSTILE_MALFORMED,       /* unknown packet type and reserved bytes set, valid CRC */
        NG_HOSTILE_TRUNCATED,       /* cut short by the CRC and one byte */
        NG_HOSTILE_OUT_OF_SEQUENCE, /* first sequence number moved back by NG_OUT_OF_SEQUENCE_BACK, valid CRC */
        NG_HOSTILE_BAD_CRC,         /* one CRC bit flipped */
        _NG_HOSTILE_MAX,
} ng_hostile;

/* "malformed", "truncated", "out-of-sequence", "bad-crc"; -EINVAL for anything else. */
int ng_hostile_from_string(const char *s);
const char *ng_hostile_to_string(ng_hostile h);

/* How far an out-of-sequence packet's first sequence number is moved back: to samples the host has
 * already had, repeated (docs/protocol.md 5.3). A few, well within the window in which needled
 * takes a sequence that went back for repeats to drop (ND_PENDEV_DUPLICATE_WINDOW); far more
 * would be a pen that restarted its count, which ends a session (docs/hazards.md, hazard 12). */
#define NG_OUT_OF_SEQUENCE_BACK 16u
/* Hostile packets waiting (each "hostile" command is one entry). */
#define NG_HOSTILE_QUEUE_MAX 16u
/* COUNT of one "hostile" command. */
#define NG_HOSTILE_COUNT_MAX 1000u

/* Parses a whole decimal number in [min, max] (nothing before or after it): 0, or -EINVAL (not a
 * number), -ERANGE (out of range). The ctl commands' counts and the program's options. */
int ng_parse_unsigned(const char *s, unsigned min, unsigned max, unsigned *ret);

/* One motor log line without its timestamps: the event happened at mono_us (the model's clock,
 * which may be before the call that reports it), text is "motor-start depth_mm=...",
 * "motor-stop cause=..." or "event NAME ...". */
typedef void (*ng_log_fn)(uint64_t mono_us, const char *text, void *userdata);

/* Creates the pen, powered on at now_us, with the model made from config. log may be NULL.
 * Returns 0, -EINVAL for a bad config, -ENOMEM. */
int ng_gadget_new(const nd_penmodel_config *config, uint64_t now_us, ng_log_fn log, void *userdata,
                  ng_gadget **ret);
/* Frees g (NULL allowed). Logs nothing: call ng_gadget_stop_motor(.., NG_STOP_EXIT) first. */
void ng_gadget_free(ng_gadget *g);

/* The model (owned by g; replaced by ng_gadget_usb_reset(), so do not keep it). */
nd_penmodel *ng_gadget_model(ng_gadget *g);

/* Runs the pen up to now_us and logs every motor stop on the way with its own time (stepping
 * the model one physics tick at a time while the motor runs). */
void ng_gadget_advance(ng_gadget *g, uint64_t now_us);

/* When ng_gadget_advance() should next be called even if nothing happens on the bus: the
 * watchdog deadline, the next motor observation while running; UINT64_MAX when idle. */
uint64_t ng_gadget_next_wakeup_us(ng_gadget *g);
/* Observation period of a running motor (fault backstops latch between requests). */
#define NG_OBSERVE_INTERVAL_US (10 * 1000u)

/* ---- ep0 ------------------------------------------------------------------------------------- */

/* Handles one control request as the pen: for IN requests writes the reply into reply (size
 * bytes, at least setup->length or the reply size) and returns its length; for OUT requests
 * data holds the data stage (setup->length bytes) and it returns 0 when accepted. -EPIPE: STALL;
 * -ETIMEDOUT: no answer (injected "unresponsive"); -EINVAL: a caller bug. Logs motor transitions
 * and the events identify, depth, speed, watchdog, telemetry, clear-faults, refused. */
int ng_gadget_control(ng_gadget *g, uint64_t now_us, const nd_control_setup *setup, const uint8_t *data,
                      size_t data_len, uint8_t *reply, size_t reply_size);

/* For an OUT request with a data stage, before reading it: 1 when the pen looks at the data
 * (the request, its wLength and wValue are right and the pen is identified), -EPIPE when it
 * STALLs without reading it, -ETIMEDOUT when it does not answer (unresponsive). On 1 the caller
 * reads the data and calls ng_gadget_control(); a refusal of the data itself can then no longer
 * become a STALL (FunctionFS: the UDC acks the status stage after an OUT data stage by itself),
 * but the model has not applied it. */
int ng_gadget_data_stage(ng_gadget *g, uint64_t now_us, const nd_control_setup *setup);

/* ---- interrupt IN ------------------------------------------------------------------------------ */

/* The next telemetry packet due by now_us, hostile when one is queued: its length, 0 when none
 * is due. size >= ND_PROTO_PACKET_MAX_SIZE. */
int ng_gadget_next_packet(ng_gadget *g, uint64_t now_us, uint8_t *buf, size_t size);
/* A packet from ng_gadget_next_packet() that never reached the host (the UDC refused or failed
 * it): its samples count as lost in the status line's lost=, with those the pen's queue bound
 * dropped. */
void ng_gadget_packet_lost(ng_gadget *g, const uint8_t *packet, size_t len);
/* When the next packet should be sent (UINT64_MAX: telemetry off or unresponsive): at once when
 * a full packet's samples are queued, else NG_TELEMETRY_BATCH_US after the oldest queued (or
 * next) sample was measured. Without IN tokens to answer (FunctionFS queues packets ahead),
 * batching keeps the packet rate, and the wake-ups of a slow machine, to a third at 1 kHz, for at
 * most 2 ms more latency. ng_gadget_next_packet() itself sends whatever is due. */
uint64_t ng_gadget_next_packet_us(ng_gadget *g);
#define NG_TELEMETRY_BATCH_US (2 * 1000u)

/* ---- the hardware around the firmware ----------------------------------------------------------- */

/* Stops the motor if it runs, logging cause (for NG_STOP_UNBIND/NG_STOP_EXIT: even when the
 * firmware is unresponsive: the pen loses its power or its host). */
void ng_gadget_stop_motor(ng_gadget *g, uint64_t now_us, ng_stop_cause cause);

/* The USB connection went away (disable/unbind/bus reset): stops the motor (cause unbind) and
 * restarts the firmware as after power-on (not identified, telemetry off, watchdog disarmed),
 * keeping the cartridge, the battery charge and the injected faults. Logs "event usb-reset". */
int ng_gadget_usb_reset(ng_gadget *g, uint64_t now_us);

/* Runs one control command line (no newline): writes "ok[ ...]" or "error MESSAGE" into reply
 * (never longer than size - 1) and returns 0 for ok, a -errno for error. Commands:
 * status, insert-cartridge ID NEEDLES, eject-cartridge, battery PCT, fault NAME,
 * hostile KIND [COUNT]. A refused command changes nothing. */
int ng_gadget_command(ng_gadget *g, uint64_t now_us, const char *line, char *reply, size_t size);
#define NG_COMMAND_LINE_MAX 256u
#define NG_REPLY_MAX 512u

/* ---- FunctionFS descriptors -------------------------------------------------------------------- */

/* Writes the FunctionFS v2 descriptor block (full, high and super speed: the pen's vendor
 * interface with its 64-byte interrupt IN endpoint 0x81 polled every 1 ms) into buf; returns its
 * length, -ENOBUFS when size is too small. */
int ng_descriptors(uint8_t *buf, size_t size);
/* Writes the FunctionFS strings block (en-US, the interface name) into buf; returns its length. */
int ng_strings(uint8_t *buf, size_t size);
#define NG_INTERFACE_NAME "needle pen (needled protocol 1)"
#define NG_DESCRIPTORS_MAX 256u
