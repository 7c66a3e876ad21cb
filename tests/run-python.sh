#!/bin/sh
# run-python.sh SCRIPT [ARGS...]: runs a Python test with Debian's interpreter (the one with gi,
# dbus and dbusmock). Under the valgrind test setup its wrapper (tests/valgrind-wrap) runs this
# script as it is, not under valgrind: Python itself is not what we check. The tests wrap the
# programs under test (needled, needlectl) in valgrind themselves.
# tests/lib holds the helper library every Python test imports (needledtest, busfixture).
PYTHONPATH="$(dirname "$0")/lib${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
exec /usr/bin/python3 "$@"
