/* bus-int.c: integers of any D-Bus integer type, range-checked (see bus-int.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>

#include "bus-int.h"

#define INTEGER_TYPES "y, n, q, i, u, x or t"

int nd_bus_read_variant_uint(sd_bus_message *m, const char *what, uint64_t min, uint64_t max, uint64_t *ret,
                             sd_bus_error *error) {
        const char *contents = NULL;
        char type = 0;
        bool negative = false;
        uint64_t value = 0;
        int64_t signed_value = 0;
        int r;

        r = sd_bus_message_peek_type(m, &type, &contents);
        if (r <= 0 || type != SD_BUS_TYPE_VARIANT || !contents || contents[0] == 0 || contents[1] != 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s must be an integer (%s)", what,
                                         INTEGER_TYPES);
        r = sd_bus_message_enter_container(m, SD_BUS_TYPE_VARIANT, contents);
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s: malformed variant", what);
        switch (contents[0]) {
        case SD_BUS_TYPE_BYTE: {
                uint8_t v;
                r = sd_bus_message_read_basic(m, 'y', &v);
                value = v;
                break;
        }
        case SD_BUS_TYPE_UINT16: {
                uint16_t v;
                r = sd_bus_message_read_basic(m, 'q', &v);
                value = v;
                break;
        }
        case SD_BUS_TYPE_UINT32: {
                uint32_t v;
                r = sd_bus_message_read_basic(m, 'u', &v);
                value = v;
                break;
        }
        case SD_BUS_TYPE_UINT64:
                r = sd_bus_message_read_basic(m, 't', &value);
                break;
        case SD_BUS_TYPE_INT16: {
                int16_t v;
                r = sd_bus_message_read_basic(m, 'n', &v);
                signed_value = v;
                negative = true;
                break;
        }
        case SD_BUS_TYPE_INT32: {
                int32_t v;
                r = sd_bus_message_read_basic(m, 'i', &v);
                signed_value = v;
                negative = true;
                break;
        }
        case SD_BUS_TYPE_INT64:
                r = sd_bus_message_read_basic(m, 'x', &signed_value);
                negative = true;
                break;
        default:
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s must be an integer (%s), not '%s'", what,
                                         INTEGER_TYPES, contents);
        }
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s: malformed integer", what);
        /* "negative" so far only means "of a signed type": settle it on the value. */
        if (negative) {
                if (signed_value < 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s is %" PRId64 "; %" PRIu64
                                                 " to %" PRIu64, what, signed_value, min, max);
                value = (uint64_t) signed_value;
        }
        if (value < min || value > max)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s is %" PRIu64 "; %" PRIu64 " to %" PRIu64,
                                         what, value, min, max);
        r = sd_bus_message_exit_container(m);
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s: malformed variant", what);
        *ret = value;
        return 0;
}
