# g. kill -9 of needled mid-session: the gadget's watchdog stops the motor the limits'
#    heartbeat_timeout_ms after the last heartbeat needled sent before it died (motor log);
#    systemd restarts needled; the ledger closes the session as daemon-restart; the pen returns
#    idle; its cartridge stays spent.
. /needled-vm/guest/lib.sh
log "g. SIGKILL of the daemon mid-session"
# systemd restarts needled after RestartSec= (1 s), and a restarted daemon stops a pen it finds
# running (hazard 16): under TCG, where the runner raises the heartbeat timeout to 3 s, it would
# beat the pen's watchdog, the thing this scenario is about. For this scenario only, a runtime
# drop-in holds the restart back until the watchdog has had its time.
DROPIN=/run/systemd/system/needled.service.d/50-vm-g-restart.conf
g_cleanup() {
	session_cleanup
	rm -f "$DROPIN"
	systemctl daemon-reload
}
trap g_cleanup EXIT

check "pen ready" pen_ready
check "clinic rules in force" clinic_rules_install
check "a fresh cartridge" fresh_cartridge
timeout_ms=$(needlectl --json limits | jq -r .limits.pen.heartbeat_timeout_ms)
log "pen.heartbeat_timeout_ms: $timeout_ms"
mkdir -p "$(dirname "$DROPIN")"
printf '[Service]\nRestartSec=%ss\n' "$(( ${timeout_ms:-500} / 1000 + 2 ))" >"$DROPIN"
systemctl daemon-reload
log "restart held back for this scenario: $(systemctl show -p RestartUSec --value needled.service)"
pid=$(needled_pid)
restarts=$(needled_restarts)
check "$OPERATOR starts a session" session_begin "$OPERATOR" acne-scars-cheeks vm-g
check "the motor runs" wait_for 10 motor_running
sleep 1
mark=$(motor_mark)
# the kill happens between these two readings (bash's clock: no process to wait for; its
# decimal point is the locale's, so every non-digit goes)
kill_from_us=${EPOCHREALTIME//[!0-9]/}
kill -KILL "$pid"
kill_to_us=${EPOCHREALTIME//[!0-9]/}
stop=$(motor_stop_line "$mark")
log "killed between $kill_from_us and $kill_to_us; motor log: $stop"
check "the motor stopped" test -n "$stop"
check "by the pen's watchdog" has "$stop" 'cause=watchdog'
# The pen's rule: the motor stops heartbeat_timeout_ms after the last heartbeat it received, not
# sooner, not later.
stop_us=$(echo "$stop" | cut -d' ' -f1)
age_us=$(echo "$stop" | sed -n 's/.* heartbeat_age_us=\([0-9]*\).*/\1/p')
expect "the pen had gone without a heartbeat for (µs)" "${age_us:-none}" "$((timeout_ms * 1000))"
# That last heartbeat was needled's last before the kill. needled sends one every timeout / 4; one
# may still be in flight at the kill and reach the pen after it, late by as long as the guest
# stalls (0.5-0.6 s measured under TCG on a busy host; see the runner): the allowance is 1 s.
# Measured from the kill itself, then, the stop comes timeout_ms after it, give or take that.
heard_us=$(( ${stop_us:-0} - ${age_us:-0} ))
interval_ms=$(( timeout_ms / 4 ))
log "the pen last heard needled $(( (heard_us - kill_from_us) / 1000 )) ms after the kill began;" \
	"the motor stopped $(( (${stop_us:-0} - kill_from_us) / 1000 )) ms after it" \
	"(heartbeat_timeout_ms $timeout_ms, interval $interval_ms ms)"
check "needled heartbeated up to the kill (last heartbeat at most one interval + 1 s before it)" \
	test "$heard_us" -ge $(( kill_from_us - (interval_ms + 1000) * 1000 ))
check "and none reached the pen later than 1 s after it" test "$heard_us" -le $(( kill_to_us + 1000000 ))

check "systemd restarts needled" wait_for 30 sh -c "systemctl is-active --quiet needled.service && [ \"\$(systemctl show -p MainPID --value needled.service)\" != '$pid' ]"
expect "NRestarts" "$(needled_restarts)" "$((restarts + 1))"
session_end_wait 10 || session_cleanup
check "the pen is back on the bus" wait_for 30 pen_on_bus
check "idle" wait_for_state idle 15
expect "ledger: the session was closed as" "$(history_get "$SESSION_ID" reason)" daemon-restart
check "ledger: with an end" test "$(history_get "$SESSION_ID" end)" -gt 0
expect "the cartridge stays spent (ledger)" "$(needlectl --json cartridge "$CARTRIDGE" | jq -r .state)" spent
expect "the pen says so" "$(pen_cartridge_state)" spent
as_user "$OPERATOR" needlectl --no-ask-password arm "$PEN_SERIAL" acne-scars-cheeks
out=$(as_user "$OPERATOR" needlectl --no-ask-password start "$PEN_SERIAL" 2>&1)
log "start with the same cartridge: $out"
check "a start with it is refused (CartridgeSpent)" has "$out" CartridgeSpent
finish
