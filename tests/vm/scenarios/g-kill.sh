# g. kill -9 of needled mid-session: the gadget's watchdog stops the motor within the limits'
#    heartbeat_timeout_ms (motor log); systemd restarts needled; the ledger closes the session as
#    daemon-restart; the pen returns idle; its cartridge stays spent.
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
killed_us=$(now_us)
kill -KILL "$pid"
stop=$(motor_stop_line "$mark")
log "killed at $killed_us; motor log: $stop"
check "the motor stopped" test -n "$stop"
check "by the pen's watchdog" has "$stop" 'cause=watchdog'
stop_us=$(echo "$stop" | cut -d' ' -f1)
after_ms=$(( (${stop_us:-0} - killed_us) / 1000 ))
log "motor stopped $after_ms ms after the kill (heartbeat_timeout_ms $timeout_ms)"
check "within heartbeat_timeout_ms of the kill ($after_ms ms <= $timeout_ms ms)" test "$after_ms" -ge 0 -a "$after_ms" -le "$timeout_ms"

check "systemd restarts needled" wait_for 30 sh -c "systemctl is-active --quiet needled.service && [ \"\$(systemctl show -p MainPID --value needled.service)\" != '$pid' ]"
expect "NRestarts" "$(needled_restarts)" "$((restarts + 1))"
session_end_wait 10 || session_cleanup
check "the pen is back on the bus" wait_for 30 pen_on_bus
check "idle" wait_for 15 pen_state_is idle
expect "ledger: the session was closed as" "$(history_get "$SESSION_ID" reason)" daemon-restart
check "ledger: with an end" test "$(history_get "$SESSION_ID" end)" -gt 0
expect "the cartridge stays spent (ledger)" "$(needlectl --json cartridge "$CARTRIDGE" | jq -r .state)" spent
expect "the pen says so" "$(pen_cartridge_state)" spent
as_user "$OPERATOR" needlectl --no-ask-password arm "$PEN_SERIAL" acne-scars-cheeks
out=$(as_user "$OPERATOR" needlectl --no-ask-password start "$PEN_SERIAL" 2>&1)
log "start with the same cartridge: $out"
check "a start with it is refused (CartridgeSpent)" has "$out" CartridgeSpent
finish
