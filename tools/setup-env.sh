# setup-env.sh: sourced by tools/run-demo and tools/run-tests. Installs the Debian 12 packages a
# step needs (only those missing), and configures and builds a meson build directory.

# What building needled needs.
NEEDLED_BUILD_PACKAGES="gcc libc6-dev pkg-config meson ninja-build check libyaml-dev nettle-dev
  libsystemd-dev libusb-1.0-0-dev libsqlite3-dev libjson-c-dev zlib1g-dev"
# What running the whole test suite needs on top: fuzzing (clang, libFuzzer runtime), valgrind,
# USB emulation (umockdev), a private bus and polkit's test double (dbus, python3-dbusmock),
# systemd-analyze for the unit's exposure score.
NEEDLED_TEST_PACKAGES="clang libclang-rt-14-dev valgrind umockdev libumockdev-dev libglib2.0-dev
  dbus python3 python3-dbus python3-dbusmock python3-gi python3-yaml systemd util-linux"
# The client examples (suite examples): gdbus-codegen, C++ and QtDBus with qdbusxml2cpp.
NEEDLED_TEST_PACKAGES="$NEEDLED_TEST_PACKAGES libglib2.0-dev-bin g++ qtbase5-dev qtbase5-dev-tools"
# The Node example (examples/node, npm ci of its lockfile): Debian's nodejs and npm, each only when
# missing (a node installed otherwise stays: Debian's npm conflicts with it). Debian's npm brings
# node-gyp, libnode-dev and libuv1-dev; node-gyp builds dbus-next's usocket with python3, make, g++.
NEEDLED_TEST_PACKAGES="$NEEDLED_TEST_PACKAGES make"
command -v node >/dev/null 2>&1 || NEEDLED_TEST_PACKAGES="$NEEDLED_TEST_PACKAGES nodejs libnode-dev"
command -v npm >/dev/null 2>&1 || NEEDLED_TEST_PACKAGES="$NEEDLED_TEST_PACKAGES npm"
# What the booted-system stage (tests/vm) needs on top: QEMU, and the tools that build its
# Debian guest image (debootstrap, mke2fs -d, zstd; curl checks the mirror first).
NEEDLED_VM_PACKAGES="qemu-system-x86 debootstrap e2fsprogs zstd util-linux curl"
# What the demo needs on top of the build: a private bus.
NEEDLED_DEMO_PACKAGES="dbus"

# How many tests run at once (tools/run-tests, tools/run-under-load). Without valgrind the tests
# mostly wait (simulated pens run in real time; measured: 151 s of CPU in 284 s of wall time on 2
# cores with 2 at once), so twice as many as there are cores; under valgrind they compute, one per
# core. NEEDLED_TEST_JOBS overrides the first.
NEEDLED_JOBS_WAITING=${NEEDLED_TEST_JOBS:-$(($(nproc) * 2))}
NEEDLED_JOBS_VALGRIND=$(nproc)

log() { printf '\n==> %s\n' "$*" >&2; }

# install_packages PKG...: apt-get installs those not yet installed (root, or sudo when present).
install_packages() {
        local missing=() p
        for p in "$@"; do
                dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
        done
        [ ${#missing[@]} -eq 0 ] && return 0
        local sudo=()
        if [ "$(id -u)" -ne 0 ]; then
                command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; return 1; }
                sudo=(sudo)
        fi
        log "installing ${missing[*]}"
        # The package lists once per run: run-tests installs in two rounds (the booted system's
        # packages first), and the second update only checked the same lists again (3.7 s here).
        if [ -z "${_needled_apt_updated:-}" ]; then
                "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
                _needled_apt_updated=1
        fi
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# configure_build DIR [meson options...] [-- ninja targets...]: sets up (or reconfigures) DIR and
# builds it (all of it, or the targets named after --); meson's and ninja's output is shown only
# when they fail.
configure_build() {
        local dir=$1; shift
        local options=() targets=() out
        while [ $# -gt 0 ] && [ "$1" != -- ]; do options+=("$1"); shift; done
        [ $# -eq 0 ] || { shift; targets=("$@"); }
        log "configuring and building $dir${targets[*]:+ (${targets[*]})}"
        if [ -f "$dir/build.ninja" ]; then
                out=$(meson setup --reconfigure "$dir" "${options[@]}" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
        else
                out=$(meson setup "$dir" "${options[@]}" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
        fi
        ninja -C "$dir" "${targets[@]}" >/dev/null || ninja -C "$dir" "${targets[@]}"
}

# The FHIR export's schema validator (tests/fhir, test cli-export-fhir): node and npm (Debian 12's
# nodejs 18 and npm, each only when missing: a node from elsewhere, e.g. NodeSource's, brings its
# own npm, which Debian's npm package conflicts with), then `npm ci` of its package-lock.json.
fhir_validator_setup() {
        command -v node >/dev/null || install_packages nodejs || return 1
        command -v npm >/dev/null || install_packages npm || return 1
        log "npm ci in tests/fhir (the FHIR R4 schema validator)"
        (cd "$(dirname "${BASH_SOURCE[0]}")/../tests/fhir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
}
