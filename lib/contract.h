/* contract.h: the names and sizes of needled's D-Bus API v1 (dbus/org.needled1.xml,
 * dbus-api.md), defined once for the daemon, needlectl, the tests and the ledger. A change
 * here is a change of the contract: update the XML's doc comments with it. */
#pragma once

/* ---- names ---------------------------------------------------------------------------------- */

#define ND_BUS_NAME          "org.needled"
#define ND_MANAGER_PATH      "/org/needled"
/* Pen objects live below this: ND_PEN_PATH_PREFIX "/" + sd_bus_path_encode(serial). */
#define ND_PEN_PATH_PREFIX   "/org/needled/pen"
#define ND_MANAGER_INTERFACE "org.needled1.Manager"
#define ND_PEN_INTERFACE     "org.needled1.Pen"
#define ND_SIM_INTERFACE     "org.needled1.Simulator"

/* The polkit actions (dbus/org.needled1.policy). */
#define ND_ACTION_OPERATE      "org.needled1.operate"
#define ND_ACTION_CONFIGURE    "org.needled1.configure"
#define ND_ACTION_READ_HISTORY "org.needled1.read-history"

/* The named errors of the API. */
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

/* ---- sizes (bytes, without a terminating NUL) ------------------------------------------------ */

/* The largest treatment profile, however it arrives: LoadProfileData's and ValidateProfile's
 * text, an installed profile file armed by LoadProfile, and the snapshot the ledger keeps of
 * every session. Larger profiles are refused when they are armed, never at Start. */
#define ND_PROFILE_TEXT_MAX (64u * 1024u)
/* Start's "label" option: an opaque reference from the clinic software. */
#define ND_SESSION_LABEL_MAX 128u
/* A cartridge id (GetCartridge, Simulator.InsertCartridge). */
#define ND_CARTRIDGE_ID_MAX 64u

/* ---- files ------------------------------------------------------------------------------------ */

/* The daemon's state directory (the ledger) when neither --state-dir nor $STATE_DIRECTORY
 * (systemd's StateDirectory=needled) names one. */
#define ND_STATE_DIR_DEFAULT "/var/lib/needled"
