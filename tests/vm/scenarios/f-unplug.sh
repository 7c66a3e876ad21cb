# f. Unplug mid-session (unbind the UDC): the session ends device-lost and is recorded; the pen
#    object goes away. Replug: the same object path, Generation one higher.
. /needled-vm/guest/lib.sh
log "f. unplug mid-session, replug"
trap session_cleanup EXIT

check "pen ready" pen_ready
check "clinic rules in force" clinic_rules_install
check "a fresh cartridge" fresh_cartridge
generation=$(pen_value Generation)
pid=$(needled_pid)
log "Generation $generation, needled pid $pid"
mark=$(motor_mark)
check "$OPERATOR starts a session" session_begin "$OPERATOR" acne-scars-cheeks vm-f
check "the motor runs" wait_for 10 motor_running
sleep 1
check "unplug: unbind the UDC" pen_unplug
check "needlectl run ends" session_end_wait 20
expect "the session's end" "$(session_reason)" device-lost
check "the pen object is gone: Manager.Pens is empty" wait_for 10 sh -c \
	"busctl --system get-property org.needled /org/needled org.needled1.Manager Pens | grep -qx 'ao 0'"
check "the pen's object is no longer introspectable" not busctl --system introspect org.needled "$PEN_PATH" org.needled1.Pen
stop=$(motor_stop_line "$mark")
log "motor log: $stop"
check "the motor stopped" test -n "$stop"
expect "ledger: reason" "$(history_get "$SESSION_ID" reason)" device-lost
check "ledger: the session has an end" test "$(history_get "$SESSION_ID" end)" -gt 0
expect "needled kept running (pid)" "$(needled_pid)" "$pid"

check "replug: bind the UDC" pen_plug
check "the pen is back on the bus" wait_for 30 pen_on_bus
check "at the same object path" sh -c "busctl --system get-property org.needled /org/needled org.needled1.Manager Pens | grep -qx 'ao 1 \"$PEN_PATH\"'"
expect "Generation one higher" "$(pen_value Generation)" "$((generation + 1))"
check "idle" wait_for 10 pen_state_is idle
finish
