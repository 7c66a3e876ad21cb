# j. Hostile USB: the gadget sends malformed, truncated and out-of-sequence packets (and packets
#    with a bad CRC): the daemon stays up and does what docs/protocol.md and docs/hazards.md say:
#    - a sample repeated or out of order is dropped and counted, the session goes on
#      (protocol.md 5.3; no gap reaches a telemetry reader);
#    - a packet that fails a check (length, CRC, type, reserved bytes) is refused whole
#      (protocol.md 5.2) and, during a session, trips telemetry-corrupt (hazards.md 11): the
#      daemon stops the motor itself and the session ends fault:telemetry-corrupt.
. /needled-vm/guest/lib.sh
log "j. hostile packets on the interrupt IN endpoint"
trap session_cleanup EXIT

check "pen ready" pen_ready
check "clinic rules in force" clinic_rules_install
pid=$(needled_pid)
restarts=$(needled_restarts)

# out of sequence: 16 samples back, within the duplicate window
check "a fresh cartridge" fresh_cartridge
cursor=$(journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
check "$OPERATOR starts a session" session_begin "$OPERATOR" acne-scars-cheeks vm-j-sequence
check "the motor runs" wait_for 10 motor_running
check "gadget: the next 5 packets out of sequence" gadget hostile out-of-sequence 5
check "the daemon drops and logs them" wait_for 10 sh -c \
	"journalctl --no-pager --after-cursor='$cursor' -u needled.service | grep -q 'repeated or out of order'"
sleep 1
expect "the session goes on" "$(pen_value State)" running
expect "no fault" "$(pen_value Fault)" ""
session_cmd stop
check "needlectl run ends" session_end_wait 15
expect "the session's end" "$(session_reason)" stopped

for kind in bad-crc truncated malformed; do
	log "-- $kind --"
	check "a fresh cartridge" fresh_cartridge
	cursor=$(journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
	check "$OPERATOR starts a session" session_begin "$OPERATOR" acne-scars-cheeks "vm-j-$kind"
	check "the motor runs" wait_for 10 motor_running
	mark=$(motor_mark)
	check "gadget: the next packet $kind" gadget hostile "$kind" 1
	check "needlectl run ends" session_end_wait 15
	expect "$kind: the session's end" "$(session_reason)" fault:telemetry-corrupt
	stop=$(motor_stop_line "$mark")
	log "motor log: $stop"
	check "$kind: the daemon stopped the motor (not the watchdog)" has "$stop" 'cause=host'
	expect "$kind: pen state" "$(pen_value State)" fault
	expect "$kind: pen fault" "$(pen_value Fault)" telemetry-corrupt
	check "$kind: the refused packet is in the journal" sh -c \
		"journalctl --no-pager --after-cursor='$cursor' -u needled.service | grep -q 'dropped'"
	expect "$kind: ledger" "$(history_get "$SESSION_ID" reason)" fault:telemetry-corrupt
	check "$kind: the fault clears once good telemetry flows" wait_for 10 \
		as_user "$OPERATOR" needlectl --no-ask-password clear-fault "$PEN_SERIAL"
	check "$kind: idle again" wait_for_state idle
done
expect "needled stayed up (same pid)" "$(needled_pid)" "$pid"
expect "and was never restarted" "$(needled_restarts)" "$restarts"
finish
