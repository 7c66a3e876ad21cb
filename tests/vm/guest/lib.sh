# lib.sh: what the vm suite's guest runner and scenarios share (bash, sourced). Runs inside the
# booted guest as root. Every assertion looks at needled from outside: systemctl, the journal,
# /proc, busctl, needlectl as a chosen user, the gadget's motor log.

V=/needled-vm
R=$V/results
# shellcheck source=/dev/null
. "$V/vm.env"

NEEDLED_USER=$NEEDLED_OPT_daemon_user
NEEDLED_GROUP=$NEEDLED_OPT_daemon_group
USB_ID=$(printf '%04x:%04x' "$NEEDLED_OPT_usb_vid" "$NEEDLED_OPT_usb_pid")
LIMITS=$NEEDLED_OPT_sysconfdir/needled/limits.yaml
case $LIMITS in /*) ;; *) LIMITS=$NEEDLED_OPT_prefix/$LIMITS ;; esac

# The pen: one FunctionFS gadget on dummy_hcd's UDC, plugged by binding it.
GADGET=pen0
PEN_SERIAL=VMPEN0001
PEN_PATH=/org/needled/pen/$PEN_SERIAL # sd_bus_path_encode leaves [A-Za-z0-9] as it is
GADGET_RUN=/run/needle-gadget
# on the share, written line by line: what the pen did survives a guest that panics (the
# motor log of the run where dummy_hcd panicked showed no unplug before it, only telemetry)
MOTOR_LOG=$R/motor-log.txt
GADGET_CTL=$GADGET_RUN/control.sock
# Users of the authorization scenarios: a member of the clinic group of the example polkit
# rules, and a local user outside it. Neither has a logind session, so polkit's defaults
# (yes for an active local session only) give them nothing: the rules file decides.
CLINIC_GROUP=needled-operators
OPERATOR=clinic-op
OUTSIDER=visitor
SHORT_PROFILE=$V/guest/vm-short-cheeks.yaml
NEEDLES=12

FAILED=0

up() { cut -d' ' -f1 /proc/uptime; }
now_us() { date +%s%6N; }
log() { printf '[%8s] %s\n' "$(up)" "$*"; }

# check DESCRIPTION COMMAND...: runs COMMAND (its output goes to the log); records a failure.
check() {
	local what=$1; shift
	if "$@"; then
		log "ok:   $what"
	else
		log "FAIL: $what"
		FAILED=$((FAILED + 1))
	fi
}
# expect DESCRIPTION ACTUAL EXPECTED
expect() {
	if [ "$2" = "$3" ]; then
		log "ok:   $1 ($2)"
	else
		log "FAIL: $1: got '$2', expected '$3'"
		FAILED=$((FAILED + 1))
	fi
}
fail() { log "FAIL: $*"; FAILED=$((FAILED + 1)); }
# finish: the scenario's exit status
finish() {
	if [ "$FAILED" = 0 ]; then log "scenario passed"; exit 0; fi
	log "scenario failed: $FAILED check(s)"
	exit 1
}

# gone PID: the process has exited (bash reaps its children as they exit)
gone() { ! kill -0 "$1" 2>/dev/null; }
# wait_for SECONDS COMMAND...: polls by deadline (every process start is slow under TCG). The
# deadline is SECONDS times NEEDLED_VM_TIME_SCALE (run-vm-tests: 4 under TCG): each is only how
# long to wait for something that must happen, and an emulated guest on a busy host is slow.
wait_for() {
	local end
	end=$(awk -v t="$1" -v k="${NEEDLED_VM_TIME_SCALE:-1}" '{ printf "%.2f", $1 + t * k }' /proc/uptime); shift
	until "$@" >/dev/null 2>&1; do
		awk -v e="$end" '{ exit !($1 > e) }' /proc/uptime && return 1
		sleep 0.1
	done
}
# guarded SECONDS COMMAND...: a write to sysfs that can block in the kernel (UDC unbind);
# if it hangs, the blocked tasks' stacks go to the results and the guest powers off.
guarded() {
	local secs=$1 pid; shift
	"$@" &
	pid=$!
	if wait_for "$secs" gone "$pid"; then
		wait "$pid"
		return
	fi
	log "HANG: '$*' blocked for $secs s; blocked tasks -> $R/dmesg-hang.txt; powering off"
	echo w >/proc/sysrq-trigger
	sleep 1
	dmesg >"$R/dmesg-hang.txt" 2>&1
	journalctl -b --no-pager -o short-monotonic >"$R/journal.txt" 2>&1
	sync
	echo o >/proc/sysrq-trigger
	return 1
}

# as_user USER COMMAND...: the command with USER's ids and groups, a clean environment, no
# session (setpriv, not su/sudo: nothing of PAM or logind involved).
as_user() {
	local user=$1; shift
	setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups --reset-env -- "$@"
}
ctl() { needlectl --no-ask-password "$@"; }

# --- the daemon ---
needled_active() { systemctl is-active --quiet needled.service; }
needled_pid() { systemctl show -p MainPID --value needled.service; }
needled_restarts() { systemctl show -p NRestarts --value needled.service; }
# needled_stop: stopped and not restarting; no bus call is made (it would activate it)
needled_stop() {
	systemctl stop needled.service
	systemctl reset-failed needled.service 2>/dev/null
	! needled_active
}
# status_field PID FIELD: a line of /proc/PID/status
status_field() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

# --- the bus (each call activates needled if it is not running) ---
mgr_get() { busctl --system get-property org.needled /org/needled org.needled1.Manager "$1"; }
pen_get() { busctl --system get-property org.needled "$PEN_PATH" org.needled1.Pen "$1"; }
# unquoted: busctl prints 's "idle"', 'u 3'
pen_value() { pen_get "$1" 2>/dev/null | sed -E 's/^[a-z]+ //; s/^"(.*)"$/\1/'; }
pen_state_is() { [ "$(pen_value State)" = "$1" ]; }
# wait_for_state STATE [SECONDS]: waits (10 s by default) for the pen's State; if it does not
# come, says what the state and fault are and what needled logged last (CI keeps only the
# stage's output, not the journal in the results)
wait_for_state() {
	wait_for "${2:-10}" pen_state_is "$1" && return 0
	log "pen state '$(pen_value State)', fault '$(pen_value Fault)', not '$1'; needled's last lines:"
	journalctl --no-pager -o short-monotonic -n 8 -u needled.service 2>&1 | sed 's/^/    /'
	return 1
}
# the pen's object is listed by the manager (the same path after every replug)
pen_on_bus() { mgr_get Pens 2>/dev/null | grep -q "\"$PEN_PATH\""; }
pen_cartridge_state() { pen_get Cartridge 2>/dev/null | grep -o '"state" s "[a-z-]*"' | sed -E 's/.*"([a-z-]*)"$/\1/'; }

# --- the pen (gadget) ---
gadget() { needle-gadget ctl "$GADGET_CTL" "$@"; }
udc() { ls /sys/class/udc | head -n 1; }
pen_plugged() { [ -n "$(cat "/sys/kernel/config/usb_gadget/$GADGET/UDC" 2>/dev/null)" ]; }
pen_sysfs() {
	local d
	for d in /sys/bus/usb/devices/*; do
		[ -f "$d/idVendor" ] || continue
		[ "$(cat "$d/idVendor"):$(cat "$d/idProduct")" = "$USB_ID" ] && { echo "$d"; return 0; }
	done
	return 1
}
pen_node() {
	local d
	d=$(pen_sysfs) || return 1
	printf '/dev/bus/usb/%03d/%03d\n' "$(cat "$d/busnum")" "$(cat "$d/devnum")"
}
pen_plug() {
	pen_plugged && return 0
	guarded 20 needle-gadget-configfs bind "$GADGET" "$(udc)" || return 1
	wait_for 20 pen_sysfs
}
pen_unplug() {
	pen_plugged || return 0
	guarded 20 needle-gadget-configfs unbind "$GADGET" || return 1
	wait_for 20 not pen_sysfs
}
# pen_ready: plugged, needled running, the pen on the bus and idle
pen_ready() {
	pen_plug || return 1
	wait_for 60 pen_on_bus || { log "pen $PEN_SERIAL not on the bus"; return 1; }
	# a fault left by an earlier scenario (root: polkit authorizes uid 0)
	pen_state_is fault && { log "clearing fault $(pen_value Fault)"; ctl clear-fault "$PEN_SERIAL"; }
	# a profile left armed by an earlier scenario (the API has no disarm): plugged in again, the
	# pen is a new connection, idle
	if pen_state_is armed; then
		log "pen armed with $(pen_value Profile | cut -c1-60): plugging it in again"
		pen_unplug && pen_plug || return 1
		wait_for 60 pen_on_bus || { log "pen $PEN_SERIAL not back on the bus"; return 1; }
	fi
	wait_for 15 pen_state_is idle || { log "pen state $(pen_value State), not idle"; return 1; }
}
# fresh_cartridge: a new single-use cartridge in the pen, seen by needled as fresh
CARTRIDGE=
fresh_cartridge() {
	CARTRIDGE=CART-$(date +%s%N | cut -c9-16)-$RANDOM
	# the daemon follows the pen's cartridge-present bit: take the old one out first
	gadget eject-cartridge >/dev/null 2>&1
	wait_for 10 sh -c "busctl --system get-property org.needled '$PEN_PATH' org.needled1.Pen Cartridge | grep -q '\"id\" s \"\"'" ||
		{ log "needled did not see the cartridge go: $(pen_get Cartridge)"; return 1; }
	gadget insert-cartridge "$CARTRIDGE" "$NEEDLES" >/dev/null || return 1
	wait_for 10 sh -c "busctl --system get-property org.needled '$PEN_PATH' org.needled1.Pen Cartridge | grep -q '\"$CARTRIDGE\"'" ||
		{ log "needled did not see cartridge $CARTRIDGE: $(pen_get Cartridge)"; return 1; }
}

# --- motor log: "<realtime µs> <monotonic µs> motor-start|motor-stop ..." ---
motor_mark() { wc -l <"$MOTOR_LOG"; }
# motor_events_since MARK: the lines written after the mark
motor_events_since() { tail -n +"$(($1 + 1))" "$MOTOR_LOG"; }
motor_running() { [ "$(gadget status | grep -o 'motor=[a-z]*')" = motor=on ]; }
# pen_lost: samples the pen measured and never handed to the host (its queue bound, a packet the
# UDC refused): the gadget's lost= count
pen_lost() { gadget status | grep -o 'lost=[0-9]*' | cut -d= -f2; }

# --- sessions driven by `needlectl run --commands` as a chosen user ---
# session_begin USER PROFILE [LABEL]: arms and starts; the run stays in the background as the
# session's owner; SESSION_PID, SESSION_OUT; commands with session_cmd.
SESSION_PID=
SESSION_OUT=
SESSION_FIFO=
SESSION_ID=
session_begin() {
	local user=$1 profile=$2 label=${3:-vm}
	SESSION_FIFO=$(mktemp -u /run/needled-vm-cmd.XXXXXX)
	SESSION_OUT=$(mktemp /run/needled-vm-run.XXXXXX)
	mkfifo -m 0600 "$SESSION_FIFO"
	# root's shell opens the fifo and the output file; the user's needlectl inherits them
	as_user "$user" needlectl --no-ask-password --json run "$PEN_SERIAL" --profile "$profile" --label "$label" \
		--commands <"$SESSION_FIFO" >"$SESSION_OUT" 2>&1 &
	SESSION_PID=$!
	exec 7>"$SESSION_FIFO"
	# needlectl run exiting (refused, say) ends the wait at once: nothing will start then
	wait_for 30 session_running_or_over
	pen_state_is running || { log "session did not start: $(cat "$SESSION_OUT")"; return 1; }
	SESSION_ID=$(pen_value SessionId)
	log "session $SESSION_ID running (needlectl run pid $SESSION_PID, user $user, profile $profile)"
}
session_running_or_over() { pen_state_is running || gone "$SESSION_PID"; }
session_cmd() { echo "$*" >&7; }
# session_end_wait SECONDS: waits for needlectl run to exit; its output in SESSION_OUT
session_end_wait() {
	wait_for "$1" gone "$SESSION_PID"
	local rc=$?
	exec 7>&-
	wait "$SESSION_PID" 2>/dev/null
	rm -f "$SESSION_FIFO"
	log "needlectl run output:"; sed 's/^/    /' "$SESSION_OUT"
	return $rc
}
# session_reason: the reason of the session-ended event of the run's output
session_reason() { jq -r 'select(.event == "session-ended") | .reason' "$SESSION_OUT" 2>/dev/null | tail -n 1; }
# history_get ID KEY: a field of the ledger's entry for session ID (as root)
history_get() {
	ctl --json history --limit 50 | jq -r --arg id "$1" --arg k "$2" '.[] | select(.id == $id) | .[$k]'
}

not() { ! "$@"; }
# has TEXT PATTERN: TEXT matches the grep pattern (TEXT may hold any quote)
has() { grep -q -e "$2" <<<"$1"; }
# clinic_rules_install: the shipped example polkit rules in force (scenario d shows it matters)
CLINIC_RULES_EXAMPLE=$NEEDLED_OPT_prefix/share/doc/needled/examples/50-needled-clinic.rules
CLINIC_RULES=/etc/polkit-1/rules.d/50-needled-clinic.rules
clinic_rules_install() {
	[ -f "$CLINIC_RULES" ] && return 0
	install -m 0644 "$CLINIC_RULES_EXAMPLE" "$CLINIC_RULES" || return 1
	# polkitd notices the new file by itself; it is in force once the member may read history
	wait_for 20 as_user "$OPERATOR" needlectl --no-ask-password history --limit 1 ||
		{ log "polkit did not take up $CLINIC_RULES"; return 1; }
}
clinic_rules_remove() {
	[ -f "$CLINIC_RULES" ] || return 0
	rm -f "$CLINIC_RULES"
	wait_for 20 not as_user "$OPERATOR" needlectl --no-ask-password history --limit 1
}
# motor_stop_line MARK: the first motor-stop after the mark (waits up to 10 s for it)
motor_stop_line() {
	wait_for 10 sh -c "tail -n +$(($1 + 1)) '$MOTOR_LOG' | grep -q ' motor-stop '" || return 1
	tail -n +"$(($1 + 1))" "$MOTOR_LOG" | grep -m 1 ' motor-stop '
}
# session_cleanup: no needlectl run left behind by a failed check
session_cleanup() {
	[ -n "$SESSION_PID" ] && kill "$SESSION_PID" 2>/dev/null
	exec 7>&- 2>/dev/null
	[ -n "$SESSION_FIFO" ] && rm -f "$SESSION_FIFO"
	return 0
}
