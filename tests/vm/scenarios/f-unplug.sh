# f. Unplug mid-session (unbind the UDC): the session ends device-lost (or heartbeat-lost when
#    the pen failed before the kernel announced the disconnect) and is recorded; the pen object
#    goes away. Replug: the same object path, Generation one higher.
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
cursor=$(journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
unplug_us=$(now_us)
check "unplug: unbind the UDC" pen_unplug
check "needlectl run ends" session_end_wait 20
reason=$(session_reason)
# When needled saw the pen fail, if it did, and when the kernel announced the disconnect: one
# unfiltered read after the cursor (journalctl before v255 skips the first match of a filter
# after a cursor). needled's entry by the time needled logged it (NEEDLED_MONOTONIC_USEC, lib/log.c:
# journald's own stamp is when it read the entry, which on a starved guest can come after a kernel
# message printed later), the kernel's by its printk time (both counted from boot): failed <=
# disconnect then proves the order, however late journald read either.
journalctl --sync 2>/dev/null || true
entries=$(journalctl --no-pager -o json --after-cursor="$cursor")
failed=$(jq -r 'select(._SYSTEMD_UNIT == "needled.service" and
	(.MESSAGE | strings | test("heartbeat not acknowledged|no telemetry for"))) |
	"\(.__REALTIME_TIMESTAMP) \(.NEEDLED_MONOTONIC_USEC)"' <<<"$entries" | head -n 1)
failed_us=${failed% *}
failed_mono=${failed#* }
disconnect_mono=$(jq -r 'select(._TRANSPORT == "kernel" and (.MESSAGE | strings | test("USB disconnect"))) |
	._SOURCE_MONOTONIC_TIMESTAMP // .__MONOTONIC_TIMESTAMP' <<<"$entries" | head -n 1)
# Every entry of needled's carries the time needled logged it, no later than journald read it.
stamps=$(jq -r 'select(._SYSTEMD_UNIT == "needled.service") |
	"\(.NEEDLED_MONOTONIC_USEC // "none") \(.__MONOTONIC_TIMESTAMP)"' <<<"$entries" | head -n 1)
stamps=${stamps:-none none}
log "needled's first entry after the unplug: logged at ${stamps% *}, read by journald at ${stamps#* } (monotonic µs)"
check "needled stamps its journal entries (NEEDLED_MONOTONIC_USEC)" test "${stamps% *}" != none
check "needled logged the entry before journald read it" test "${stamps% *}" -le "${stamps#* }"
log "unplug began $unplug_us (realtime µs); needled saw the pen fail: ${failed_us:-never} (realtime), ${failed_mono:--} (monotonic); the kernel's disconnect: ${disconnect_mono:-not seen} (monotonic)"
if [ "$reason" = fault:heartbeat-lost ]; then
	# The gadget goes first, the host's disconnect follows when the guest's hub thread runs. On a
	# starved guest (a one-CPU TCG guest on a loaded host) that took longer than needled waits
	# for a pen that has stopped answering: a heartbeat came back with an error, or telemetry
	# stopped for the heartbeat timeout (lib/pendev.c), and needled ended the session in fault
	# at once, as it must for a pen it still sees. A cable pulled from real hardware can race the
	# same way. needled's stamp is when its loop handled the failure, not when the transfer
	# failed: in L13 the heartbeat's transfer came back with an I/O error 30 ms after the
	# kernel's disconnect message, from a loop that was behind, and only then did libusb say the
	# device was gone. So the order against the kernel's message proves nothing either way; what
	# is checked is that the unplug caused it: the failure after the unplug began, and needled
	# then removing the pen (device-lost), as it does for an unplugged one.
	check "needled logged the failure" test -n "$failed_us"
	check "the pen failed after the unplug began" test "${failed_us:-0}" -ge "$unplug_us"
	check "the kernel announced the disconnect" test -n "$disconnect_mono"
	log "needled handled the failure $(( ${failed_mono:-0} - ${disconnect_mono:-0} )) µs after the kernel's disconnect message (negative: before)"
else
	expect "the session's end" "$reason" device-lost
fi
check "the pen object is gone: Manager.Pens is empty" wait_for 10 sh -c \
	"busctl --system get-property org.needled /org/needled org.needled1.Manager Pens | grep -qx 'ao 0'"
if [ "$reason" = fault:heartbeat-lost ]; then
	journalctl --sync 2>/dev/null || true
	removed_mono=$(journalctl --no-pager -o json --after-cursor="$cursor" | jq -r 'select(._SYSTEMD_UNIT == "needled.service" and
		(.MESSAGE | strings | test("pen removed \\(device-lost\\)"))) | .NEEDLED_MONOTONIC_USEC' | head -n 1)
	log "needled removed the pen at ${removed_mono:-never} (monotonic µs)"
	check "needled then removed the pen as unplugged (device-lost)" \
		test -n "$removed_mono" -a "${removed_mono:-0}" -ge "${failed_mono:-0}"
fi
check "the pen's object is no longer introspectable" not busctl --system introspect org.needled "$PEN_PATH" org.needled1.Pen
stop=$(motor_stop_line "$mark")
log "motor log: $stop"
check "the motor stopped" test -n "$stop"
expect "ledger: reason" "$(history_get "$SESSION_ID" reason)" "${reason:-device-lost}"
check "ledger: the session has an end" test "$(history_get "$SESSION_ID" end)" -gt 0
expect "needled kept running (pid)" "$(needled_pid)" "$pid"

check "replug: bind the UDC" pen_plug
check "the pen is back on the bus" wait_for 30 pen_on_bus
check "at the same object path" sh -c "busctl --system get-property org.needled /org/needled org.needled1.Manager Pens | grep -qx 'ao 1 \"$PEN_PATH\"'"
expect "Generation one higher" "$(pen_value Generation)" "$((generation + 1))"
check "idle" wait_for_state idle
finish
