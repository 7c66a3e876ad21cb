#!/bin/sh
# run-python.sh SCRIPT [ARGS...]: runs a Python test with Debian's interpreter (the one with gi,
# dbus and dbusmock). Under the valgrind test setup valgrind wraps this shell, and the exec
# below leaves valgrind (it does not trace children): Python itself is not what we check. The
# tests wrap the programs under test (needled, needlectl) in valgrind themselves.
exec /usr/bin/python3 "$@"
