/* transport.c: the implementation-independent part of the pen transport. */
#include <errno.h>
#include <stdlib.h>

#include "transport.h"

void nd_transport_set_callbacks(nd_transport *t, nd_packet_fn on_packet, nd_gone_fn on_gone,
                                void *userdata) {
        t->on_packet = on_packet;
        t->on_gone = on_gone;
        t->userdata = userdata;
}

int nd_transport_control(nd_transport *t, const nd_control_setup *setup, const uint8_t *out_data,
                         uint32_t timeout_ms, nd_control_done_fn done, void *userdata) {
        if (!t || !setup)
                return -EINVAL;
        if (!(setup->request_type & ND_CONTROL_DIR_IN) && setup->length > 0 && !out_data)
                return -EINVAL;
        if (t->gone)
                return -ENODEV;
        return t->ops->control(t, setup, out_data, timeout_ms, done, userdata);
}

int nd_transport_start_stream(nd_transport *t) {
        if (!t)
                return -EINVAL;
        if (t->gone)
                return -ENODEV;
        return t->ops->start_stream(t);
}

void nd_transport_stop_stream(nd_transport *t) {
        if (t && !t->gone)
                t->ops->stop_stream(t);
}

const char *nd_transport_describe(const nd_transport *t) {
        return t && t->description ? t->description : "(no transport)";
}

void nd_transport_free(nd_transport *t) {
        if (t)
                t->ops->free(t);
}

void nd_transport_report_gone(nd_transport *t, int status) {
        if (t->gone)
                return;
        t->gone = true;
        if (t->on_gone)
                t->on_gone(t, status, t->userdata);
}
