/* simulator.h: the org.needled1.Simulator object (simulator.c), present only with simulation on. */
#pragma once

#include "daemon.h"

/* Adds the Simulator interface to /org/needled. Returns 0 or -errno. */
int nd_simulator_export(nd_daemon *d);
