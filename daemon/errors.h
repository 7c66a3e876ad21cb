/* errors.h: the named D-Bus errors of API v1 (org.needled1.Error.*), and their errno mapping. */
#pragma once

#include <systemd/sd-bus.h>

#define ND_ERROR_PREFIX              "org.needled1.Error."
#define ND_ERROR_INVALID_PROFILE     ND_ERROR_PREFIX "InvalidProfile"
#define ND_ERROR_INVALID_LIMITS      ND_ERROR_PREFIX "InvalidLimits"
#define ND_ERROR_LIMITS_UNAVAILABLE  ND_ERROR_PREFIX "LimitsUnavailable"
#define ND_ERROR_LIMIT_EXCEEDED      ND_ERROR_PREFIX "LimitExceeded"
#define ND_ERROR_WRONG_STATE         ND_ERROR_PREFIX "WrongState"
#define ND_ERROR_NO_CARTRIDGE        ND_ERROR_PREFIX "NoCartridge"
#define ND_ERROR_CARTRIDGE_SPENT     ND_ERROR_PREFIX "CartridgeSpent"
#define ND_ERROR_LOW_BATTERY         ND_ERROR_PREFIX "LowBattery"
#define ND_ERROR_FAULT               ND_ERROR_PREFIX "Fault"
#define ND_ERROR_DEVICE_GONE         ND_ERROR_PREFIX "DeviceGone"
#define ND_ERROR_NOT_OWNER           ND_ERROR_PREFIX "NotOwner"
#define ND_ERROR_STORAGE             ND_ERROR_PREFIX "Storage"
#define ND_ERROR_UNKNOWN_PROFILE     ND_ERROR_PREFIX "UnknownProfile"
#define ND_ERROR_UNKNOWN_PEN         ND_ERROR_PREFIX "UnknownPen"
/* Not in the contract's list: an internal failure that is none of the above (out of memory,
 * a bug). Named, so that no bare System.Error.* errno reaches a client. */
#define ND_ERROR_INTERNAL            ND_ERROR_PREFIX "Internal"

/* sd-bus's map between our error names and errnos, so that clients (needlectl) built with
 * sd-bus get a meaningful errno, and the daemon's handlers can never leak System.Error.*. */
extern const sd_bus_error_map nd_error_map[];

/* Registers nd_error_map with sd-bus (idempotent). Returns 0 or -errno. */
int nd_errors_register(void);
