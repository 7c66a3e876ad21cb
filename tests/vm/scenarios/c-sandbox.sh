# c. The daemon runs as its own user (created by sysusers) with the sandbox in force:
#    NoNewPrivs, a seccomp filter, no capabilities, its state directory 0700 and its own;
#    systemd-analyze security on the running unit gives the offline check's score.
. /needled-vm/guest/lib.sh
log "c. user, sandbox, state directory, exposure score"

check "pen ready and needled running" pen_ready
pid=$(needled_pid)
log "needled pid $pid"
entry=$(getent passwd "$NEEDLED_USER")
log "passwd: $entry"
check "sysusers created the system user $NEEDLED_USER" test -n "$entry"
uid=$(id -u "$NEEDLED_USER")
check "$NEEDLED_USER is a system user (uid $uid < 1000)" test "$uid" -lt 1000
expect "its login shell" "$(echo "$entry" | cut -d: -f7)" /usr/sbin/nologin
expect "process real/effective/saved/fs uid" "$(awk '$1 == "Uid:" { print $2, $3, $4, $5 }' "/proc/$pid/status")" "$uid $uid $uid $uid"
gid=$(getent group "$NEEDLED_GROUP" | cut -d: -f3)
expect "process gid" "$(awk '$1 == "Gid:" { print $2, $3, $4, $5 }' "/proc/$pid/status")" "$gid $gid $gid $gid"
expect "NoNewPrivs" "$(status_field "$pid" NoNewPrivs)" 1
expect "Seccomp (2: filter)" "$(status_field "$pid" Seccomp)" 2
check "Seccomp_filters >= 1 ($(status_field "$pid" Seccomp_filters))" test "$(status_field "$pid" Seccomp_filters)" -ge 1
for cap in CapInh CapPrm CapEff CapBnd CapAmb; do
	expect "$cap" "$(status_field "$pid" "$cap")" 0000000000000000
done
sched=$(chrt -p "$pid")
log "scheduling: $sched"
check "real-time FIFO as the unit sets it" has "$sched" SCHED_FIFO
check "in a mount namespace of its own" test "$(readlink "/proc/$pid/ns/mnt")" != "$(readlink /proc/1/ns/mnt)"
check "in a user namespace of its own (PrivateUsers)" test "$(readlink "/proc/$pid/ns/user")" != "$(readlink /proc/1/ns/user)"

state=/var/lib/needled
expect "state directory owner:group mode" "$(stat -c '%U:%G %a' "$state")" "$NEEDLED_USER:$NEEDLED_GROUP 700"
ledger=$(find "$state" -maxdepth 1 -name 'ledger.sqlite' -print -quit)
check "the ledger exists in it" test -n "$ledger"
[ -n "$ledger" ] && expect "ledger owner, mode (UMask 0077)" "$(stat -c '%U %a' "$ledger")" "$NEEDLED_USER 600"

live=$(systemd-analyze security --no-pager needled.service 2>&1)
echo "$live" >"$R/c-sandbox/security-live.txt" 2>/dev/null
live_score=$(echo "$live" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
offline_score=$(systemd-analyze security --offline=true --no-pager "$NEEDLED_OPT_prefix/lib/systemd/system/needled.service" 2>&1 |
	sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
log "exposure: running unit $live_score, installed file offline $offline_score, host's offline check ${NEEDLED_HOST_EXPOSURE:-?}"
check "systemd-analyze security rates the running unit" test -n "$live_score"
expect "the running unit's score equals the offline check's" "$live_score" "$offline_score"
[ -n "${NEEDLED_HOST_EXPOSURE:-}" ] && expect "... and the host's offline check of the build" "$live_score" "$NEEDLED_HOST_EXPOSURE"
finish
