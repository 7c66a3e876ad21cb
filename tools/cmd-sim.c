/* cmd-sim.c: needlectl sim, the org.needled1.Simulator of a daemon started with --simulate:
 * simulated pens for demos, application developers and tests. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "bus-util.h"
#include "needlectl.h"

#define BATTERY_PERCENT_MAX 100u
#define NEEDLES_MAX 1000u
#define TELEMETRY_RATE_MAX_HZ 100000u

static void sim_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl sim COMMAND [ARGS...] [--system|--session]\n"
                "\n"
                "Drives the simulator of a needled started with --simulate (never present\n"
                "otherwise). Simulated pens speak the same protocol as hardware; they can do\n"
                "0 to 2.5 mm in 0.05 mm steps and 25 to 150 Hz, and start with a full battery and\n"
                "no cartridge. PEN (serial or object path) may be omitted with one pen.\n"
                "\n"
                "Commands:\n"
                "  add-pen [--serial S] [--model M] [--battery PERCENT] [--rate HZ]\n"
                "          [--firmware VERSION] [--json]\n"
                "                         connect a simulated pen; prints its serial (--json:\n"
                "                         {serial, path})\n"
                "  remove-pen [PEN]       disconnect it, as if unplugged\n"
                "  insert-cartridge [PEN] ID NEEDLES\n"
                "                         fit a cartridge\n"
                "  eject [PEN]            remove the fitted cartridge\n"
                "  battery [PEN] PERCENT  set the charge, 0 to 100\n"
                "  fault [PEN] FAULT      make it misbehave: over-temperature, motor-stall,\n"
                "                         over-current, depth-deviation, unresponsive,\n"
                "                         corrupt-telemetry, refuse-start, or clear\n"
                "\n"
                "Options:\n" CTL_COMMON_HELP "\n"
                "When needled has no simulator (not started with --simulate) the exit status is 1.\n"
                CTL_EXIT_HELP);
}

/* A Simulator call, with the hint when the daemon has no simulator. */
static int sim_call(sd_bus *bus, const char *what, sd_bus_message **ret_reply, const char *member,
                    const char *types, ...) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_bus_message_ sd_bus_message *m = NULL;
        int r = sd_bus_message_new_method_call(bus, &m, ND_BUS_NAME, ND_MANAGER_PATH, ND_SIM_INTERFACE,
                                               member);
        if (r >= 0 && types) {
                va_list ap;
                va_start(ap, types);
                r = sd_bus_message_appendv(m, types, ap);
                va_end(ap);
        }
        if (r < 0)
                return ctl_log_bus_error(what, NULL, r);
        r = sd_bus_call(bus, m, 0, &error, ret_reply);
        if (r < 0) {
                if (sd_bus_error_has_name(&error, SD_BUS_ERROR_UNKNOWN_INTERFACE) ||
                    sd_bus_error_has_name(&error, SD_BUS_ERROR_UNKNOWN_METHOD)) {
                        fprintf(stderr, "needlectl: %s: needled has no simulator (start it with --simulate) (%s)\n",
                                what, error.name);
                        return NEEDLECTL_EXIT_INVALID;
                }
                return ctl_log_bus_error(what, &error, r);
        }
        return 0;
}

typedef struct add_pen_args {
        const char *serial;
        const char *model;
        const char *firmware;
        uint64_t battery;
        bool have_battery;
        uint64_t rate;
        bool have_rate;
} add_pen_args;

enum { ARG_SERIAL = CTL_ARG_VERB, ARG_MODEL, ARG_BATTERY, ARG_RATE, ARG_FIRMWARE };

static int add_pen_option(int c, const char *arg, void *userdata) {
        add_pen_args *a = userdata;
        switch (c) {
        case ARG_SERIAL: a->serial = arg; return 0;
        case ARG_MODEL: a->model = arg; return 0;
        case ARG_FIRMWARE: a->firmware = arg; return 0;
        case ARG_BATTERY:
                if (ctl_parse_unsigned(arg, BATTERY_PERCENT_MAX, &a->battery) < 0)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "sim add-pen: --battery takes 0 to 100, not '%s'", arg);
                a->have_battery = true;
                return 0;
        case ARG_RATE:
                if (ctl_parse_unsigned(arg, TELEMETRY_RATE_MAX_HZ, &a->rate) < 0 || a->rate == 0)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "sim add-pen: --rate takes a rate in Hz from 1, not '%s'", arg);
                a->have_rate = true;
                return 0;
        default:
                return NEEDLECTL_EXIT_USAGE;
        }
}

static int sim_add_pen(sd_bus *bus, const ctl_common *common, const add_pen_args *a) {
        _cleanup_bus_message_ sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        int r = sd_bus_message_new_method_call(bus, &m, ND_BUS_NAME, ND_MANAGER_PATH, ND_SIM_INTERFACE,
                                               "AddPen");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'a', "{sv}");
        if (r >= 0 && a->serial)
                r = sd_bus_message_append(m, "{sv}", "serial", "s", a->serial);
        if (r >= 0 && a->model)
                r = sd_bus_message_append(m, "{sv}", "model", "s", a->model);
        if (r >= 0 && a->firmware)
                r = sd_bus_message_append(m, "{sv}", "firmware_version", "s", a->firmware);
        if (r >= 0 && a->have_battery)
                r = sd_bus_message_append(m, "{sv}", "battery_percent", "u", (uint32_t) a->battery);
        if (r >= 0 && a->have_rate)
                r = sd_bus_message_append(m, "{sv}", "telemetry_rate_hz", "u", (uint32_t) a->rate);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return ctl_log_bus_error("cannot add a pen", NULL, r);
        r = sd_bus_call(bus, m, 0, &error, &reply);
        if (r < 0) {
                if (sd_bus_error_has_name(&error, SD_BUS_ERROR_UNKNOWN_INTERFACE) ||
                    sd_bus_error_has_name(&error, SD_BUS_ERROR_UNKNOWN_METHOD)) {
                        fprintf(stderr, "needlectl: cannot add a pen: needled has no simulator (start it with --simulate) (%s)\n",
                                error.name);
                        return NEEDLECTL_EXIT_INVALID;
                }
                return ctl_log_bus_error("cannot add a pen", &error, r);
        }
        const char *path;
        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot read the new pen's path: %s", strerror(-r));
        _cleanup_free_ char *serial = ctl_pen_serial_from_path(path);
        if (common->json) {
                _cleanup_json_ json_object *o = json_object_new_object();
                if (!o)
                        return ctl_oom();
                json_object_object_add(o, "serial", serial ? json_object_new_string(serial) : NULL);
                json_object_object_add(o, "path", json_object_new_string(path));
                return ctl_print_json(o);
        }
        printf("%s\n", serial ? serial : path);
        return fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
}

/* The commands of sim, each with its positional arguments after an optional PEN. */
static const struct { const char *name; int args; } sim_commands[] = {
        { "add-pen", 0 }, { "remove-pen", 0 }, { "insert-cartridge", 2 },
        { "eject", 0 }, { "battery", 1 }, { "fault", 1 },
};

typedef struct sim_args {
        add_pen_args add;
        int nargs;           /* positional arguments of the command (after PEN) */
        uint64_t number;     /* insert-cartridge's NEEDLES, battery's PERCENT */
} sim_args;

static int sim_option(int c, const char *arg, void *userdata) {
        return add_pen_option(c, arg, &((sim_args *) userdata)->add);
}

/* The command and its arguments are checked before anything is asked of the daemon. */
static int sim_check(ctl_invocation *inv) {
        sim_args *a = inv->args;
        if (inv->argc == 0) {
                fprintf(stderr, "needlectl sim: missing command\n");
                sim_usage(stderr);
                return NEEDLECTL_EXIT_USAGE;
        }
        const char *cmd = inv->argv[0];
        int argc = inv->argc;
        char **argv = inv->argv;
        a->nargs = -1;
        for (size_t i = 0; i < ELEMENTSOF(sim_commands); i++)
                if (STREQ(cmd, sim_commands[i].name))
                        a->nargs = sim_commands[i].args;
        if (a->nargs < 0) {
                fprintf(stderr, "needlectl sim: unknown command '%s'\n", cmd);
                sim_usage(stderr);
                return NEEDLECTL_EXIT_USAGE;
        }
        const add_pen_args *add = &a->add;
        bool add_options = add->serial || add->model || add->firmware || add->have_battery || add->have_rate;
        if (!STREQ(cmd, "add-pen") && add_options)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "sim %s: --serial, --model, --battery, --rate and --firmware "
                                                      "belong to add-pen", cmd);
        int npos = argc - 1;
        int max = STREQ(cmd, "add-pen") ? 0 : a->nargs + 1;
        if (npos < a->nargs || npos > max) {
                fprintf(stderr, "needlectl sim %s: %s\n", cmd, npos < a->nargs ? "missing argument" : "too many arguments");
                sim_usage(stderr);
                return NEEDLECTL_EXIT_USAGE;
        }
        if (STREQ(cmd, "insert-cartridge")) {
                if (argv[argc - 2][0] == '\0')
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "sim insert-cartridge: the cartridge id is empty");
                if (ctl_parse_unsigned(argv[argc - 1], NEEDLES_MAX, &a->number) < 0 || a->number == 0)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "sim insert-cartridge: NEEDLES is a count from 1 to %u, not '%s'",
                                        NEEDLES_MAX, argv[argc - 1]);
        } else if (STREQ(cmd, "battery")) {
                if (ctl_parse_unsigned(argv[argc - 1], BATTERY_PERCENT_MAX, &a->number) < 0)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "sim battery: PERCENT is 0 to 100, not '%s'", argv[argc - 1]);
        }
        return -1;
}

static const struct option sim_options[] = {
        CTL_COMMON_OPTIONS,
        { "serial",   required_argument, NULL, ARG_SERIAL },
        { "model",    required_argument, NULL, ARG_MODEL },
        { "battery",  required_argument, NULL, ARG_BATTERY },
        { "rate",     required_argument, NULL, ARG_RATE },
        { "firmware", required_argument, NULL, ARG_FIRMWARE },
        { NULL, 0, NULL, 0 }
};

const ctl_verb_syntax ctl_syntax_sim = {
        .usage = sim_usage,
        .options = sim_options,
        .handler = sim_option,
        .args_size = sizeof(sim_args),
        .check = sim_check,
};

int verb_sim(ctl_invocation *inv) {
        const sim_args *a = inv->args;
        const char *cmd = inv->argv[0];
        int argc = inv->argc;
        char **argv = inv->argv;
        sd_bus *bus = inv->bus;
        if (STREQ(cmd, "add-pen"))
                return sim_add_pen(bus, &inv->common, &a->add);

        _cleanup_free_ char *path = NULL;
        int r = ctl_resolve_pen(bus, argc - 1 > a->nargs ? argv[1] : NULL, &path);
        if (r != 0)
                return r;
        if (STREQ(cmd, "remove-pen"))
                return sim_call(bus, "cannot remove the pen", NULL, "RemovePen", "o", path);
        if (STREQ(cmd, "insert-cartridge"))
                return sim_call(bus, "cannot insert the cartridge", NULL, "InsertCartridge", "osu", path, argv[argc - 2],
                                (uint32_t) a->number);
        if (STREQ(cmd, "eject"))
                return sim_call(bus, "cannot eject the cartridge", NULL, "EjectCartridge", "o", path);
        if (STREQ(cmd, "battery"))
                return sim_call(bus, "cannot set the battery", NULL, "SetBattery", "ou", path, (uint32_t) a->number);
        return sim_call(bus, "cannot inject the fault", NULL, "InjectFault", "os", path, argv[argc - 1]);
}
