/* penmodel.c: the pen's firmware as a deterministic model (see penmodel.h, docs/protocol.md). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "penmodel.h"
#include "util.h"

#define UM_PER_MM   1000.0
#define CHZ_PER_HZ  100.0
#define MS_PER_S    1000.0
#define TICK_S      (ND_PENMODEL_TICK_US / (double) USEC_PER_SEC)

/* Motor electrics: current = base + per-Hz + per-Hz-per-mm of depth (skin load), while driven.
 * At 150 Hz and 2.5 mm: 80 + 525 + 300 = 905 mA, below the default 1200 mA limit. */
#define CURRENT_BASE_MA           80.0
#define CURRENT_PER_HZ_MA         3.5
#define CURRENT_PER_HZ_MM_MA      0.8
/* A stalled rotor draws much more, but stays below the 1200 mA default limit so a stall is
 * reported as a stall. */
#define STALL_CURRENT_BASE_MA     700.0
#define STALL_CURRENT_PER_HZ_MA   3.0
#define STALL_CURRENT_MAX_MA      1100.0
#define STALL_SPEED_FRACTION      0.05
#define INJECTED_OVER_CURRENT_MA  1600.0
#define INJECTED_DEPTH_OFFSET_MM  0.6

/* Handpiece thermal model: first order towards ambient + R_th * I. 905 mA -> ~37.7 °C. */
#define THERMAL_TAU_S             120.0
#define THERMAL_RESISTANCE_C_PER_A 14.0
#define INJECTED_HEAT_RATE_C_PER_S 10.0
#define INJECTED_HEAT_MAX_C        30.0
#define INJECTED_HEAT_DECAY_C_PER_S 20.0

/* Battery: 1000 mAh, electronics draw 20 mA on top of the motor. */
#define BATTERY_CAPACITY_MAH      1000.0
#define ELECTRONICS_CURRENT_MA    20.0
#define SECONDS_PER_HOUR          3600.0
#define PERCENT                   100.0

/* Measurement noise (standard deviations). */
#define NOISE_DEPTH_MM            0.003
#define NOISE_SPEED_HZ            0.1
#define NOISE_CURRENT_MA          4.0
#define NOISE_TEMPERATURE_C       0.02
#define SPEED_STOPPED_HZ          0.05 /* below this the motor reads 0, no noise */

/* Corrupt-telemetry modes, used in turn so every decoder check sees them. */
enum {
        CORRUPT_CRC,
        CORRUPT_TYPE,
        CORRUPT_COUNT,
        CORRUPT_RANGE,
        CORRUPT_TRUNCATED,
        _CORRUPT_MAX,
};
#define CORRUPT_TYPE_BYTE        0x7Fu
#define CORRUPT_TEMPERATURE_CC   20000 /* 200 °C */

typedef struct queued_sample {
        uint64_t due_us;
        nd_proto_sample sample;
} queued_sample;

struct nd_penmodel {
        unsigned n_ref;
        nd_penmodel_config cfg;
        uint64_t rng;

        uint64_t boot_us;
        uint64_t now_us;  /* the last time seen */
        uint64_t tick_us; /* the last physics tick processed */

        /* host-visible state */
        bool identified;
        bool motor_running;
        uint64_t motor_start_us;
        uint16_t set_depth_um, set_speed_chz;
        uint8_t faults;
        unsigned injected;

        /* physics (true values) */
        double speed_hz, depth_mm, current_ma, temperature_c, heat_offset_c, battery_percent;
        double speed_alpha, depth_alpha, thermal_alpha;

        /* backstop persistence, in ticks */
        unsigned over_current_ticks, stall_ticks, depth_ticks;

        /* watchdog */
        bool wd_armed;
        unsigned wd_timeout_ms;
        uint64_t last_heartbeat_us;

        /* telemetry */
        bool tel_enabled;
        unsigned tel_rate_hz;
        uint64_t tel_base_us, tel_index; /* sample k of this schedule is due at base + k s / rate */
        uint32_t next_sequence;
        uint64_t produced, sent, dropped;
        /* ND_PENMODEL_QUEUE_MAX slots, allocated apart and not zeroed: a slot is written before
         * it is read, and the queue restarts at slot 0 whenever it empties, so a host that keeps
         * up only ever uses the first few and the rest of the memory is never touched. */
        queued_sample *queue;
        unsigned q_head, q_len;
        unsigned corrupt_next;

        /* cartridge */
        bool cart_present;
        char cart_id[ND_PROTO_CARTRIDGE_ID_SIZE + 1];
        unsigned cart_needles;
};

/* ---- Faults by name ---------------------------------------------------------------------------- */

static const char *const nd_penmodel_fault_table[_ND_PENMODEL_FAULT_MAX] = {
        [ND_PENMODEL_FAULT_OVER_TEMPERATURE] = "over-temperature",
        [ND_PENMODEL_FAULT_MOTOR_STALL] = "motor-stall",
        [ND_PENMODEL_FAULT_OVER_CURRENT] = "over-current",
        [ND_PENMODEL_FAULT_DEPTH_DEVIATION] = "depth-deviation",
        [ND_PENMODEL_FAULT_UNRESPONSIVE] = "unresponsive",
        [ND_PENMODEL_FAULT_CORRUPT_TELEMETRY] = "corrupt-telemetry",
        [ND_PENMODEL_FAULT_REFUSE_START] = "refuse-start",
        [ND_PENMODEL_FAULT_CLEAR] = "clear",
};

DEFINE_STRING_TABLE_FROM_STRING(nd_penmodel_fault)
DEFINE_STRING_TABLE_TO_STRING(nd_penmodel_fault, nd_penmodel_fault)

static bool injected(const nd_penmodel *m, nd_penmodel_fault f) {
        return m->injected & (1u << f);
}

/* ---- Deterministic noise ---------------------------------------------------------------------- */

/* splitmix64: small, fast, and good enough for measurement noise. */
static uint64_t rng_next(nd_penmodel *m) {
        uint64_t z = (m->rng += UINT64_C(0x9E3779B97F4A7C15));
        z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
        return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static double rng_uniform(nd_penmodel *m) {
        return (double) (rng_next(m) >> 11) * 0x1.0p-52 - 1.0;
}

/* Roughly Gaussian with standard deviation sigma: the sum of four uniforms (Irwin-Hall), which
 * needs no libm transcendental and is bounded (|x| < 3.5 sigma), so noise never makes a
 * measurement look like a fault. */
static double rng_noise(nd_penmodel *m, double sigma) {
        double sum = 0;
        for (int i = 0; i < 4; i++)
                sum += rng_uniform(m);
        /* each uniform has variance 1/3; four have 4/3 */
        return sum * sqrt(3.0 / 4.0) * sigma;
}

/* ---- Config ------------------------------------------------------------------------------------- */

void nd_penmodel_config_init(nd_penmodel_config *c) {
        *c = (nd_penmodel_config) {
                .battery_percent = 100,
                .telemetry_rate_hz = 1000,
                .seed = 1,
                .depth_min_um = 0,
                .depth_max_um = 2500,
                .depth_step_um = 50,
                .speed_min_chz = 2500,
                .speed_max_chz = 15000,
        };
        snprintf(c->serial, sizeof c->serial, "%s", "SIM0001");
        snprintf(c->model, sizeof c->model, "%s", "needle-sim");
        snprintf(c->firmware_version, sizeof c->firmware_version, "%s", "1.0.0");
}

static void fill_identity(const nd_penmodel_config *c, uint8_t minor, nd_proto_identity *id) {
        *id = (nd_proto_identity) {
                .protocol_major = ND_PROTO_VERSION_MAJOR,
                .protocol_minor = minor,
                .depth_min_mm = c->depth_min_um / UM_PER_MM,
                .depth_max_mm = c->depth_max_um / UM_PER_MM,
                .depth_step_mm = c->depth_step_um / UM_PER_MM,
                .speed_min_hz = c->speed_min_chz / CHZ_PER_HZ,
                .speed_max_hz = c->speed_max_chz / CHZ_PER_HZ,
                .max_telemetry_rate_hz = c->telemetry_rate_hz,
        };
        memcpy(id->serial, c->serial, sizeof id->serial);
        memcpy(id->model, c->model, sizeof id->model);
        memcpy(id->firmware_version, c->firmware_version, sizeof id->firmware_version);
}

/* A config is valid when its IDENTIFY reply encodes and decodes: one set of rules. */
static int config_validate(const nd_penmodel_config *c) {
        nd_proto_identity id, back;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];

        if (c->battery_percent > ND_PROTO_BATTERY_MAX_PERCENT)
                return -EINVAL;
        if (!memchr(c->serial, 0, sizeof c->serial) || !memchr(c->model, 0, sizeof c->model) ||
            !memchr(c->firmware_version, 0, sizeof c->firmware_version))
                return -EINVAL;
        fill_identity(c, ND_PROTO_VERSION_MINOR, &id);
        if (nd_proto_encode_identity(&id, buf, sizeof buf) < 0)
                return -EINVAL;
        if (nd_proto_decode_identity(buf, sizeof buf, ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR, &back, NULL) < 0)
                return -EINVAL;
        return 0;
}

int nd_penmodel_new(const nd_penmodel_config *c, uint64_t now_us, nd_penmodel **ret) {
        if (!c || !ret)
                return -EINVAL;
        int r = config_validate(c);
        if (r < 0)
                return r;

        nd_penmodel *m = calloc(1, sizeof *m);
        if (!m)
                return -ENOMEM;
        m->queue = malloc(ND_PENMODEL_QUEUE_MAX * sizeof *m->queue);
        if (!m->queue) {
                free(m);
                return -ENOMEM;
        }
        m->n_ref = 1;
        m->cfg = *c;
        m->rng = c->seed;
        m->boot_us = m->now_us = m->tick_us = now_us;
        m->set_depth_um = c->depth_min_um;
        m->set_speed_chz = c->speed_min_chz;
        m->depth_mm = c->depth_min_um / UM_PER_MM;
        m->temperature_c = ND_PENMODEL_START_TEMPERATURE_C;
        m->battery_percent = c->battery_percent;
        m->speed_alpha = 1.0 - exp(-TICK_S * MS_PER_S / ND_PENMODEL_SPEED_TAU_MS);
        m->depth_alpha = 1.0 - exp(-TICK_S * MS_PER_S / ND_PENMODEL_DEPTH_TAU_MS);
        m->thermal_alpha = 1.0 - exp(-TICK_S / THERMAL_TAU_S);
        m->wd_timeout_ms = ND_PROTO_WATCHDOG_DEFAULT_MS;
        m->tel_rate_hz = c->telemetry_rate_hz;
        *ret = m;
        return 0;
}

nd_penmodel *nd_penmodel_ref(nd_penmodel *m) {
        if (m)
                m->n_ref++;
        return m;
}

nd_penmodel *nd_penmodel_unref(nd_penmodel *m) {
        if (m && --m->n_ref == 0) {
                free(m->queue);
                free(m);
        }
        return NULL;
}

const nd_penmodel_config *nd_penmodel_get_config(const nd_penmodel *m) {
        return &m->cfg;
}

/* ---- Physics and firmware checks ------------------------------------------------------------------ */

static unsigned battery_reported(const nd_penmodel *m) {
        /* ceil: a freshly set 20 % reads 20 % until a whole percent is gone */
        double b = ceil(m->battery_percent - 1e-9);
        return b <= 0 ? 0 : (unsigned) b;
}

static double measured_depth_true(const nd_penmodel *m) {
        return m->depth_mm + (injected(m, ND_PENMODEL_FAULT_DEPTH_DEVIATION) ? INJECTED_DEPTH_OFFSET_MM : 0);
}

static double current_now(const nd_penmodel *m) {
        if (injected(m, ND_PENMODEL_FAULT_OVER_CURRENT))
                return INJECTED_OVER_CURRENT_MA;
        if (!m->motor_running)
                return 0;
        double set_hz = m->set_speed_chz / CHZ_PER_HZ;
        if (injected(m, ND_PENMODEL_FAULT_MOTOR_STALL))
                return MIN(STALL_CURRENT_BASE_MA + STALL_CURRENT_PER_HZ_MA * set_hz, STALL_CURRENT_MAX_MA);
        return CURRENT_BASE_MA + CURRENT_PER_HZ_MA * m->speed_hz + CURRENT_PER_HZ_MM_MA * m->speed_hz * m->depth_mm;
}

static void stop_motor(nd_penmodel *m) {
        m->motor_running = false;
        m->stall_ticks = m->depth_ticks = 0;
}

static void latch(nd_penmodel *m, uint8_t fault) {
        m->faults |= fault;
        stop_motor(m);
}

static bool condition_over_temperature(const nd_penmodel *m) {
        return m->temperature_c + m->heat_offset_c >= ND_PENMODEL_OVER_TEMPERATURE_C;
}

static bool condition_over_current(const nd_penmodel *m) {
        return m->current_ma >= ND_PENMODEL_OVER_CURRENT_MA;
}

static bool condition_depth(const nd_penmodel *m) {
        return fabs(measured_depth_true(m) - m->set_depth_um / UM_PER_MM) > ND_PENMODEL_DEPTH_DEVIATION_MM;
}

static bool condition_low_battery(const nd_penmodel *m) {
        return battery_reported(m) <= ND_PENMODEL_LOW_BATTERY_PERCENT;
}

static void physics_tick(nd_penmodel *m, uint64_t t) {
        double set_hz = m->set_speed_chz / CHZ_PER_HZ;
        double target_hz = 0;
        if (m->motor_running)
                target_hz = injected(m, ND_PENMODEL_FAULT_MOTOR_STALL) ? set_hz * STALL_SPEED_FRACTION : set_hz;
        m->speed_hz += (target_hz - m->speed_hz) * m->speed_alpha;
        m->depth_mm += (m->set_depth_um / UM_PER_MM - m->depth_mm) * m->depth_alpha;
        m->current_ma = current_now(m);

        double heat_target = ND_PENMODEL_AMBIENT_C + THERMAL_RESISTANCE_C_PER_A * m->current_ma / MS_PER_S;
        m->temperature_c += (heat_target - m->temperature_c) * m->thermal_alpha;
        if (injected(m, ND_PENMODEL_FAULT_OVER_TEMPERATURE))
                m->heat_offset_c = MIN(m->heat_offset_c + INJECTED_HEAT_RATE_C_PER_S * TICK_S, INJECTED_HEAT_MAX_C);
        else
                m->heat_offset_c = MAX(m->heat_offset_c - INJECTED_HEAT_DECAY_C_PER_S * TICK_S, 0.0);

        double drain_mah = (m->current_ma + ELECTRONICS_CURRENT_MA) * TICK_S / SECONDS_PER_HOUR;
        m->battery_percent = MAX(m->battery_percent - drain_mah / BATTERY_CAPACITY_MAH * PERCENT, 0.0);

        /* The firmware's own backstops. */
        if (condition_over_temperature(m))
                latch(m, ND_PROTO_FAULT_OVER_TEMPERATURE);
        m->over_current_ticks = condition_over_current(m) ? m->over_current_ticks + 1 : 0;
        if (m->over_current_ticks * ND_PENMODEL_TICK_US >= ND_PENMODEL_OVER_CURRENT_MS * USEC_PER_MSEC)
                latch(m, ND_PROTO_FAULT_OVER_CURRENT);
        if (condition_low_battery(m))
                latch(m, ND_PROTO_FAULT_LOW_BATTERY);
        if (m->motor_running) {
                bool past_grace = t - m->motor_start_us >= ND_PENMODEL_SPINUP_GRACE_MS * USEC_PER_MSEC;
                m->stall_ticks = past_grace && m->speed_hz < ND_PENMODEL_STALL_FRACTION * set_hz ? m->stall_ticks + 1 : 0;
                if (m->stall_ticks * ND_PENMODEL_TICK_US >= ND_PENMODEL_STALL_MS * USEC_PER_MSEC)
                        latch(m, ND_PROTO_FAULT_MOTOR_STALL);
        }
        if (m->motor_running) {
                m->depth_ticks = condition_depth(m) ? m->depth_ticks + 1 : 0;
                if (m->depth_ticks * ND_PENMODEL_TICK_US >= ND_PENMODEL_DEPTH_DEVIATION_MS * USEC_PER_MSEC)
                        latch(m, ND_PROTO_FAULT_DEPTH_DEVIATION);
        }
}

static uint8_t status_bits(const nd_penmodel *m) {
        return (m->motor_running ? ND_PROTO_STATUS_MOTOR_RUNNING : 0) |
               (m->cart_present ? ND_PROTO_STATUS_CARTRIDGE_PRESENT : 0) |
               (m->wd_armed ? ND_PROTO_STATUS_WATCHDOG_ARMED : 0);
}

static uint64_t watchdog_deadline(const nd_penmodel *m) {
        return m->last_heartbeat_us + (uint64_t) m->wd_timeout_ms * USEC_PER_MSEC;
}

static void feed_watchdog(nd_penmodel *m) {
        m->wd_armed = true;
        m->last_heartbeat_us = m->now_us;
}

static void watchdog_expire(nd_penmodel *m) {
        m->wd_armed = false;
        /* Heartbeat loss only matters while the needles move: a host that went quiet while the pen
         * was idle has hurt no one, and latching would only force a CLEAR_FAULTS on reconnect. */
        if (m->motor_running)
                latch(m, ND_PROTO_FAULT_WATCHDOG_EXPIRED);
}

/* ---- Telemetry ----------------------------------------------------------------------------------- */

static uint64_t sample_due(const nd_penmodel *m) {
        return m->tel_base_us + m->tel_index * USEC_PER_SEC / m->tel_rate_hz;
}

static void queue_drop_all(nd_penmodel *m) {
        m->dropped += m->q_len;
        m->q_head = m->q_len = 0;
}

static void take_sample(nd_penmodel *m, uint64_t due) {
        /* The noise is drawn in a fixed order, once per sample, whatever the state: determinism. */
        double depth_noise = rng_noise(m, NOISE_DEPTH_MM), speed_noise = rng_noise(m, NOISE_SPEED_HZ),
               current_noise = rng_noise(m, NOISE_CURRENT_MA), temperature_noise = rng_noise(m, NOISE_TEMPERATURE_C);
        double depth = measured_depth_true(m) + depth_noise;
        double speed = m->speed_hz < SPEED_STOPPED_HZ ? 0 : m->speed_hz + speed_noise;
        double current = m->current_ma > 0 ? m->current_ma + current_noise : 0;
        nd_proto_sample s = {
                .sequence = m->next_sequence++,
                .timestamp_us = (uint32_t) (due - m->boot_us),
                .depth_mm = MAX(depth, 0.0),
                .speed_hz = MAX(speed, 0.0),
                .current_ma = MAX(current, 0.0),
                .temperature_c = m->temperature_c + m->heat_offset_c + temperature_noise,
                .battery_percent = battery_reported(m),
                .status = status_bits(m),
                .faults = m->faults,
        };
        m->produced++;
        m->tel_index++;

        if (injected(m, ND_PENMODEL_FAULT_UNRESPONSIVE)) {
                m->dropped++;
                return;
        }
        if (m->q_len == ND_PENMODEL_QUEUE_MAX) {
                m->q_head = (m->q_head + 1) % ND_PENMODEL_QUEUE_MAX;
                m->q_len--;
                m->dropped++;
        }
        m->queue[(m->q_head + m->q_len) % ND_PENMODEL_QUEUE_MAX] = (queued_sample) { .due_us = due, .sample = s };
        m->q_len++;
}

/* ---- Time ------------------------------------------------------------------------------------------ */

void nd_penmodel_advance(nd_penmodel *m, uint64_t now_us) {
        if (now_us < m->now_us)
                now_us = m->now_us;

        /* Process the events up to now_us in time order; at equal times the tick first (a sample
         * sees the state of its instant), then the watchdog, then the sample. */
        for (;;) {
                uint64_t tick = m->tick_us + ND_PENMODEL_TICK_US;
                uint64_t wd = m->wd_armed ? watchdog_deadline(m) : UINT64_MAX;
                uint64_t sample = m->tel_enabled ? sample_due(m) : UINT64_MAX;
                uint64_t next = MIN(tick, MIN(wd, sample));
                if (next > now_us)
                        break;
                m->now_us = next;
                if (next == tick) {
                        m->tick_us = tick;
                        physics_tick(m, tick);
                } else if (next == wd)
                        watchdog_expire(m);
                else
                        take_sample(m, sample);
        }
        m->now_us = now_us;
}

unsigned nd_penmodel_telemetry_rate_hz(const nd_penmodel *m) {
        return m->tel_rate_hz;
}

uint64_t nd_penmodel_next_due_us(const nd_penmodel *m) {
        if (!m->tel_enabled || injected(m, ND_PENMODEL_FAULT_UNRESPONSIVE))
                return UINT64_MAX;
        if (m->q_len > 0)
                return m->queue[m->q_head].due_us;
        return sample_due(m);
}

static void corrupt(nd_penmodel *m, uint8_t *buf, int *len) {
        size_t body = (size_t) *len - ND_PROTO_PACKET_CRC_SIZE;
        bool recompute = true;

        switch (m->corrupt_next) {
        case CORRUPT_CRC:
                buf[body] ^= 0x01;
                recompute = false;
                break;
        case CORRUPT_TYPE:
                buf[0] = CORRUPT_TYPE_BYTE;
                break;
        case CORRUPT_COUNT:
                buf[1] = (uint8_t) (buf[1] + 1);
                break;
        case CORRUPT_RANGE: {
                /* temperature of the first sample (header 8 + offset 10), little-endian */
                const size_t off = ND_PROTO_PACKET_HEADER_SIZE + 10;
                buf[off] = (uint8_t) (CORRUPT_TEMPERATURE_CC & 0xff);
                buf[off + 1] = (uint8_t) (CORRUPT_TEMPERATURE_CC >> 8);
                break;
        }
        case CORRUPT_TRUNCATED:
        default:
                *len -= 1;
                recompute = false;
                break;
        }
        if (recompute) {
                uint32_t crc = nd_proto_crc32(buf, body);
                for (size_t i = 0; i < ND_PROTO_PACKET_CRC_SIZE; i++)
                        buf[body + i] = (uint8_t) (crc >> (8 * i));
        }
        m->corrupt_next = (m->corrupt_next + 1) % _CORRUPT_MAX;
}

int nd_penmodel_next_packet(nd_penmodel *m, uint64_t now_us, uint8_t *buf, size_t size) {
        if (!m || !buf)
                return -EINVAL;
        if (size < ND_PROTO_PACKET_MAX_SIZE)
                return -ENOBUFS;
        nd_penmodel_advance(m, now_us);
        if (injected(m, ND_PENMODEL_FAULT_UNRESPONSIVE) || m->q_len == 0)
                return 0;

        nd_proto_sample batch[ND_PROTO_SAMPLES_PER_PACKET_MAX];
        unsigned n = MIN(m->q_len, ND_PROTO_SAMPLES_PER_PACKET_MAX);
        for (unsigned i = 0; i < n; i++)
                batch[i] = m->queue[(m->q_head + i) % ND_PENMODEL_QUEUE_MAX].sample;
        int len = nd_proto_encode_packet(batch, n, buf, size);
        m->q_head = (m->q_head + n) % ND_PENMODEL_QUEUE_MAX;
        m->q_len -= n;
        if (m->q_len == 0)
                m->q_head = 0;
        if (len < 0) {
                /* Not expected (the model keeps its values in range); never wedge the queue. */
                m->dropped += n;
                return len;
        }
        m->sent += n;
        if (injected(m, ND_PENMODEL_FAULT_CORRUPT_TELEMETRY))
                corrupt(m, buf, &len);
        return len;
}

/* ---- Control requests --------------------------------------------------------------------------- */

static int reply(const uint8_t *out, size_t n, const nd_control_setup *setup, uint8_t *data, size_t data_size) {
        size_t len = MIN(n, (size_t) setup->length);
        if (data_size < len)
                return -EINVAL;
        memcpy(data, out, len);
        return (int) len;
}

static void fill_status(const nd_penmodel *m, nd_proto_status *st) {
        unsigned remaining_ms = 0;
        if (m->wd_armed) {
                uint64_t left_us = watchdog_deadline(m) - m->now_us; /* > 0: expiry is processed at the deadline */
                remaining_ms = (unsigned) ((left_us + USEC_PER_MSEC - 1) / USEC_PER_MSEC);
        }
        *st = (nd_proto_status) {
                .motor_running = m->motor_running,
                .status = status_bits(m),
                .faults = m->faults,
                .battery_percent = battery_reported(m),
                .temperature_c = m->temperature_c + m->heat_offset_c,
                .set_depth_mm = m->set_depth_um / UM_PER_MM,
                .set_speed_hz = m->set_speed_chz / CHZ_PER_HZ,
                .watchdog_timeout_ms = m->wd_timeout_ms,
                .watchdog_remaining_ms = MIN(remaining_ms, m->wd_timeout_ms),
                .telemetry_rate_hz = m->tel_enabled ? m->tel_rate_hz : 0,
                .telemetry_enabled = m->tel_enabled,
                .timestamp_us = (uint32_t) (m->now_us - m->boot_us),
        };
}

static void clear_faults(nd_penmodel *m) {
        uint8_t keep = 0;
        if (condition_over_temperature(m))
                keep |= ND_PROTO_FAULT_OVER_TEMPERATURE;
        if (condition_over_current(m))
                keep |= ND_PROTO_FAULT_OVER_CURRENT;
        if (condition_depth(m))
                keep |= ND_PROTO_FAULT_DEPTH_DEVIATION;
        if (condition_low_battery(m))
                keep |= ND_PROTO_FAULT_LOW_BATTERY;
        /* a stall and a lost heartbeat end with the motor stopped */
        m->faults &= keep;
        m->over_current_ticks = 0;
}

static void set_telemetry(nd_penmodel *m, bool enabled, unsigned rate_hz) {
        if (!enabled) {
                m->tel_enabled = false;
                queue_drop_all(m);
                return;
        }
        /* Start at the next physics tick, as firmware samples on its control tick: pens powered
         * on at the same millisecond phase then sample in step, as pens on one USB bus are polled
         * in the same 1 ms frames (the simulator powers them on so). When already streaming, a
         * lower rate continues from the next due time; a higher one from one new period after
         * the last sample (protocol.md §5.4), so no two samples crowd and a host that raises the
         * rate (an idle pen coming into use) gets full-rate samples at once, not after up to a
         * whole slow period. */
        uint64_t next_tick = m->tick_us + (m->now_us > m->tick_us ? ND_PENMODEL_TICK_US : 0);
        uint64_t base = next_tick;
        if (m->tel_enabled) {
                base = sample_due(m);
                if (rate_hz > m->tel_rate_hz && m->tel_index > 0) {
                        uint64_t last = m->tel_base_us + (m->tel_index - 1) * USEC_PER_SEC / m->tel_rate_hz;
                        base = MIN(base, MAX(next_tick, last + USEC_PER_SEC / rate_hz));
                }
        }
        m->tel_enabled = true;
        m->tel_rate_hz = rate_hz;
        m->tel_base_us = base;
        m->tel_index = 0;
}

int nd_penmodel_control(nd_penmodel *m, uint64_t now_us, const nd_control_setup *setup, uint8_t *data,
                        size_t data_size) {
        nd_proto_request req;
        int r;

        if (!m || !setup)
                return -EINVAL;
        bool in = setup->request_type & ND_CONTROL_DIR_IN;
        if ((setup->length > 0 && !data) || (!in && data_size < setup->length))
                return -EINVAL;

        nd_penmodel_advance(m, now_us);
        if (injected(m, ND_PENMODEL_FAULT_UNRESPONSIVE))
                return -ETIMEDOUT;

        r = nd_proto_parse_request(setup, data, in ? 0 : setup->length, &req, NULL);
        if (r < 0)
                return -EPIPE;
        if (!m->identified && req.code != ND_PROTO_REQ_IDENTIFY && req.code != ND_PROTO_REQ_MOTOR_STOP)
                return -EPIPE;

        switch (req.code) {
        case ND_PROTO_REQ_IDENTIFY: {
                nd_proto_identity id;
                uint8_t out[ND_PROTO_IDENTITY_SIZE];
                int minor = nd_proto_negotiate(ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR, req.host_major,
                                               req.host_minor);
                if (minor < 0)
                        return -EPIPE;
                fill_identity(&m->cfg, (uint8_t) minor, &id);
                r = nd_proto_encode_identity(&id, out, sizeof out);
                if (r < 0)
                        return r;
                r = reply(out, (size_t) r, setup, data, data_size);
                if (r >= 0)
                        m->identified = true;
                return r;
        }
        case ND_PROTO_REQ_GET_STATUS: {
                nd_proto_status st;
                uint8_t out[ND_PROTO_STATUS_SIZE];
                fill_status(m, &st);
                r = nd_proto_encode_status(&st, out, sizeof out);
                if (r < 0)
                        return r;
                return reply(out, (size_t) r, setup, data, data_size);
        }
        case ND_PROTO_REQ_GET_CARTRIDGE: {
                nd_proto_cartridge c = { .present = m->cart_present, .needles = m->cart_needles };
                uint8_t out[ND_PROTO_CARTRIDGE_SIZE];
                memcpy(c.id, m->cart_id, sizeof c.id);
                r = nd_proto_encode_cartridge(&c, out, sizeof out);
                if (r < 0)
                        return r;
                return reply(out, (size_t) r, setup, data, data_size);
        }
        case ND_PROTO_REQ_SET_DEPTH:
                if (req.depth_um < m->cfg.depth_min_um || req.depth_um > m->cfg.depth_max_um ||
                    (req.depth_um - m->cfg.depth_min_um) % m->cfg.depth_step_um != 0)
                        return -EPIPE;
                m->set_depth_um = req.depth_um;
                m->depth_ticks = 0;
                return 0;
        case ND_PROTO_REQ_SET_SPEED:
                if (req.speed_chz < m->cfg.speed_min_chz || req.speed_chz > m->cfg.speed_max_chz)
                        return -EPIPE;
                m->set_speed_chz = req.speed_chz;
                return 0;
        case ND_PROTO_REQ_MOTOR_START:
                if (!m->cart_present || m->faults != 0 || injected(m, ND_PENMODEL_FAULT_REFUSE_START))
                        return -EPIPE;
                if (!m->motor_running) {
                        m->motor_running = true;
                        m->motor_start_us = m->now_us;
                        m->stall_ticks = m->depth_ticks = 0;
                }
                feed_watchdog(m);
                return 0;
        case ND_PROTO_REQ_MOTOR_STOP:
                stop_motor(m);
                return 0;
        case ND_PROTO_REQ_HEARTBEAT:
                feed_watchdog(m);
                return 0;
        case ND_PROTO_REQ_SET_WATCHDOG:
                if (req.watchdog_timeout_ms < ND_PROTO_WATCHDOG_MIN_MS || req.watchdog_timeout_ms > ND_PROTO_WATCHDOG_MAX_MS)
                        return -EPIPE;
                m->wd_timeout_ms = req.watchdog_timeout_ms;
                feed_watchdog(m);
                return 0;
        case ND_PROTO_REQ_SET_TELEMETRY:
                if (req.telemetry_enabled && req.telemetry_rate_hz > m->cfg.telemetry_rate_hz)
                        return -EPIPE;
                set_telemetry(m, req.telemetry_enabled, req.telemetry_rate_hz);
                return 0;
        case ND_PROTO_REQ_CLEAR_FAULTS:
                clear_faults(m);
                return 0;
        }
        return -EPIPE;
}

/* ---- Simulator controls --------------------------------------------------------------------------- */

int nd_penmodel_insert_cartridge(nd_penmodel *m, uint64_t now_us, const char *id, unsigned needles) {
        if (!m || !id)
                return -EINVAL;
        size_t n = strnlen(id, ND_PROTO_CARTRIDGE_ID_SIZE + 1);
        if (n == 0 || n > ND_PROTO_CARTRIDGE_ID_SIZE || needles < 1 || needles > UINT8_MAX)
                return -EINVAL;
        for (size_t i = 0; i < n; i++)
                if ((uint8_t) id[i] < 0x21 || (uint8_t) id[i] > 0x7e)
                        return -EINVAL;
        nd_penmodel_advance(m, now_us);
        if (m->cart_present)
                return -EBUSY;
        m->cart_present = true;
        memcpy(m->cart_id, id, n);
        m->cart_id[n] = '\0';
        m->cart_needles = needles;
        return 0;
}

int nd_penmodel_eject_cartridge(nd_penmodel *m, uint64_t now_us) {
        if (!m)
                return -EINVAL;
        nd_penmodel_advance(m, now_us);
        if (!m->cart_present)
                return -ENOENT;
        stop_motor(m);
        m->cart_present = false;
        memset(m->cart_id, 0, sizeof m->cart_id);
        m->cart_needles = 0;
        return 0;
}

int nd_penmodel_set_battery(nd_penmodel *m, uint64_t now_us, unsigned percent) {
        if (!m || percent > ND_PROTO_BATTERY_MAX_PERCENT)
                return -EINVAL;
        nd_penmodel_advance(m, now_us);
        m->battery_percent = percent;
        return 0;
}

int nd_penmodel_inject_fault(nd_penmodel *m, uint64_t now_us, nd_penmodel_fault fault) {
        if (!m || (unsigned) fault >= _ND_PENMODEL_FAULT_MAX)
                return -EINVAL;
        nd_penmodel_advance(m, now_us);
        if (fault == ND_PENMODEL_FAULT_CLEAR) {
                m->injected = 0;
                return 0;
        }
        if (fault == ND_PENMODEL_FAULT_UNRESPONSIVE)
                queue_drop_all(m);
        m->injected |= 1u << fault;
        return 0;
}

void nd_penmodel_get_state(const nd_penmodel *m, nd_penmodel_state *ret) {
        *ret = (nd_penmodel_state) {
                .now_us = m->now_us,
                .identified = m->identified,
                .motor_running = m->motor_running,
                .set_depth_mm = m->set_depth_um / UM_PER_MM,
                .set_speed_hz = m->set_speed_chz / CHZ_PER_HZ,
                .speed_hz = m->speed_hz,
                .depth_mm = m->depth_mm,
                .current_ma = m->current_ma,
                .temperature_c = m->temperature_c + m->heat_offset_c,
                .battery_percent = m->battery_percent,
                .status = status_bits(m),
                .faults = m->faults,
                .injected = m->injected,
                .watchdog_armed = m->wd_armed,
                .watchdog_timeout_ms = m->wd_timeout_ms,
                .watchdog_deadline_us = m->wd_armed ? watchdog_deadline(m) : 0,
                .last_heartbeat_us = m->last_heartbeat_us,
                .telemetry_enabled = m->tel_enabled,
                .telemetry_rate_hz = m->tel_rate_hz,
                .next_sequence = m->next_sequence,
                .samples_produced = m->produced,
                .samples_sent = m->sent,
                .samples_dropped = m->dropped,
                .queued = m->q_len,
                .cartridge_present = m->cart_present,
                .cartridge_needles = m->cart_needles,
        };
        memcpy(ret->cartridge_id, m->cart_id, sizeof ret->cartridge_id);
}
