# i. Limits tightened mid-session (edit /etc/needled/limits.yaml, ReloadLimits as root): the
#    running session stops with limits-changed.
. /needled-vm/guest/lib.sh
log "i. limits tightened mid-session"
trap 'session_cleanup; [ -f /run/limits.orig ] && cp /run/limits.orig "$LIMITS"' EXIT

check "pen ready" pen_ready
check "clinic rules in force" clinic_rules_install
check "a fresh cartridge" fresh_cartridge
cp "$LIMITS" /run/limits.orig
digest=$(mgr_get LimitsDigest)
mark=$(motor_mark)
check "$OPERATOR starts acne-scars-cheeks (1.25 mm)" session_begin "$OPERATOR" acne-scars-cheeks vm-i
check "the motor runs" wait_for 10 motor_running
sed -i -E 's/^(  cheeks: *\{max_depth_mm: )1\.5\}/\11.0}/' "$LIMITS"
check "cheeks limited to 1.0 mm in $LIMITS" grep -q '^  cheeks: *{max_depth_mm: 1.0}' "$LIMITS"
out=$(needlectl --no-ask-password reload-limits 2>&1)
rc=$?
log "root: reload-limits (exit $rc): $out"
expect "root's ReloadLimits" "$rc" 0
check "needlectl run ends" session_end_wait 15
expect "the session's end" "$(session_reason)" limits-changed
stop=$(motor_stop_line "$mark")
log "motor log: $stop"
check "the motor stopped by the host's command" has "$stop" 'cause=host'
expect "ledger: reason" "$(history_get "$SESSION_ID" reason)" limits-changed
check "the new limits are in force (digest changed)" test "$(mgr_get LimitsDigest)" != "$digest"
check "arming the 1.25 mm profile is now refused" not as_user "$OPERATOR" needlectl --no-ask-password arm "$PEN_SERIAL" acne-scars-cheeks
cp /run/limits.orig "$LIMITS"
check "restore and reload the shipped limits" needlectl --no-ask-password reload-limits
expect "the digest is the shipped file's again" "$(mgr_get LimitsDigest)" "$digest"
finish
