# b. Plug (bind the UDC): the device node gets the daemon's group and mode 0660 from the udev
#    rule; needled.service is started by SYSTEMD_WANTS; the pen appears on the bus.
. /needled-vm/guest/lib.sh
log "b. plug-in: udev gives the node to $NEEDLED_GROUP and starts needled.service"

check "the pen is unplugged" pen_unplug
check "needled.service is stopped" needled_stop
since=$(date '+%F %T')
sleep 1
check "bind the gadget to the UDC ($(udc))" pen_plug
node=$(pen_node)
log "device: $(pen_sysfs) -> $node"
check "device node $node exists" wait_for 10 test -c "$node"
# udev applies the rule's GROUP/MODE before it announces the device
wait_for 10 sh -c "[ \"\$(stat -c %G '$node')\" = '$NEEDLED_GROUP' ]"
expect "node group (udev rule)" "$(stat -c %G "$node")" "$NEEDLED_GROUP"
expect "node mode (udev rule)" "$(stat -c %a "$node")" 660
expect "node owner" "$(stat -c %U "$node")" root
check "udev tagged the device for systemd" sh -c "udevadm info -q property '$node' | grep -qx 'SYSTEMD_WANTS=needled.service'"
# no bus call before this point: only udev can have started it
check "needled.service started by the plug-in" wait_for 30 needled_active
wanted_by=$(systemctl show -p WantedBy --value needled.service)
log "needled.service WantedBy: $wanted_by"
check "needled.service is wanted by the pen's device unit" has "$wanted_by" '\.device'
check "no D-Bus activation happened" sh -c \
	"! journalctl --no-pager --since='$since' -u dbus.service | grep -q \"service name='org.needled'\""
check "the pen appears on the bus: Manager.Pens lists $PEN_PATH" wait_for 30 pen_on_bus
expect "its Serial" "$(pen_value Serial)" "$PEN_SERIAL"
check "its state is idle" wait_for_state idle
# needled streams at the most the pen can (its IDENTIFY; needle-gadget --telemetry-rate)
expect "its TelemetryRateHz (the pen's highest)" "$(pen_value TelemetryRateHz)" "$NEEDLED_VM_TELEMETRY_HZ"
check "the journal says the pen connected" sh -c \
	"journalctl --no-pager --since='$since' -u needled.service | grep -q 'pen connected'"
finish
