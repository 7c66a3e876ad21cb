# h. systemctl stop needled mid-session: the motor stop reaches the pen before the daemon exits
#    (motor log order) and the session is recorded as ended.
. /needled-vm/guest/lib.sh
log "h. systemctl stop mid-session"
trap session_cleanup EXIT

check "pen ready" pen_ready
check "clinic rules in force" clinic_rules_install
check "a fresh cartridge" fresh_cartridge
check "$OPERATOR starts a session" session_begin "$OPERATOR" acne-scars-cheeks vm-h
check "the motor runs" wait_for 10 motor_running
sleep 1
mark=$(motor_mark)
cursor=$(journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
stop_begin_us=$(now_us)
check "systemctl stop needled.service" systemctl stop needled.service
stop=$(motor_stop_line "$mark")
log "motor log: $stop"
check "the motor stopped by the host's command, not the watchdog" has "$stop" 'cause=host'
motor_us=$(echo "$stop" | cut -d' ' -f1)
# the end of the process as systemd saw it
exit_us=$(journalctl --no-pager -o json --after-cursor="$cursor" -u needled.service |
	jq -r 'select(.MESSAGE | test("Deactivated successfully|Main process exited|Stopped")) | .__REALTIME_TIMESTAMP' | head -n 1)
log "stop requested $stop_begin_us, motor stopped $motor_us, needled gone $exit_us (realtime µs)"
check "the motor stopped after the stop request" test "${motor_us:-0}" -ge "$stop_begin_us"
check "the motor stopped before the daemon exited" test -n "$exit_us" -a "${motor_us:-0}" -lt "${exit_us:-0}"
check "needled exited cleanly (not killed)" sh -c "systemctl show -p Result --value needled.service | grep -qx success"
session_end_wait 10 || session_cleanup
# the record, read through a new instance (activated by the call)
expect "ledger: the session ended as" "$(history_get "$SESSION_ID" reason)" stopped
check "ledger: with an end" test "$(history_get "$SESSION_ID" end)" -gt 0
finish
