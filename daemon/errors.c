/* errors.c: the errno each named error maps to, for sd-bus clients and the daemon's fallback. */
#include <errno.h>

#include "errors.h"

const sd_bus_error_map nd_error_map[] = {
        SD_BUS_ERROR_MAP(ND_ERROR_INVALID_PROFILE,    EINVAL),
        SD_BUS_ERROR_MAP(ND_ERROR_INVALID_LIMITS,     EBADMSG),
        SD_BUS_ERROR_MAP(ND_ERROR_LIMITS_UNAVAILABLE, ENOENT),
        SD_BUS_ERROR_MAP(ND_ERROR_LIMIT_EXCEEDED,     ERANGE),
        SD_BUS_ERROR_MAP(ND_ERROR_WRONG_STATE,        EBUSY),
        SD_BUS_ERROR_MAP(ND_ERROR_NO_CARTRIDGE,       ENOMEDIUM),
        SD_BUS_ERROR_MAP(ND_ERROR_CARTRIDGE_SPENT,    ESTALE),
        SD_BUS_ERROR_MAP(ND_ERROR_LOW_BATTERY,        ENOSPC),
        SD_BUS_ERROR_MAP(ND_ERROR_FAULT,              EIO),
        SD_BUS_ERROR_MAP(ND_ERROR_DEVICE_GONE,        ENODEV),
        SD_BUS_ERROR_MAP(ND_ERROR_NOT_OWNER,          EPERM),
        SD_BUS_ERROR_MAP(ND_ERROR_STORAGE,            EROFS),
        SD_BUS_ERROR_MAP(ND_ERROR_UNKNOWN_PROFILE,    ENOENT),
        SD_BUS_ERROR_MAP(ND_ERROR_UNKNOWN_PEN,        ENXIO),
        SD_BUS_ERROR_MAP(ND_ERROR_INTERNAL,           EPROTO),
        SD_BUS_ERROR_MAP_END
};

int nd_errors_register(void) {
        int r = sd_bus_error_add_map(nd_error_map);
        return r < 0 ? r : 0;
}
