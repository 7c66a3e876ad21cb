# a. No pen plugged: needled is not running. A client call on the system bus starts it through
#    D-Bus activation (dbus/org.needled.service -> needled.service).
. /needled-vm/guest/lib.sh
log "a. no pen, no daemon; a bus call activates it"

check "the pen is unplugged" pen_unplug
check "needled.service is stopped" needled_stop
owner=$(busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus NameHasOwner s org.needled)
expect "nobody owns org.needled" "$owner" "b false"
check "org.needled is activatable on the system bus" sh -c \
	'busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ListActivatableNames | grep -q "\"org.needled\""'

since=$(date '+%F %T')
sleep 1
# an unprivileged client: reading a property needs no authorization
version=$(as_user "$OUTSIDER" busctl --system get-property org.needled /org/needled org.needled1.Manager Version)
rc=$?
expect "$OUTSIDER's call Manager.Version succeeded" "$rc" 0
log "Version: $version"
check "needled.service is active after the call" needled_active
pid=$(needled_pid)
check "needled runs (MainPID $pid)" test "$pid" -gt 0
check "the bus asked systemd to activate needled.service" sh -c \
	"journalctl --no-pager --since='$since' -u dbus.service | grep -q \"Activating via systemd: service name='org.needled' unit='needled.service'\""
check "systemd started it" sh -c "journalctl --no-pager --since='$since' -u needled.service | grep -q 'Started'"
finish
