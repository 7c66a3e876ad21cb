# d. Authorization with the real polkitd and the shipped example rules (members of a clinic
#    group operate and read history): a member runs a treatment with needlectl; a user
#    outside the group is refused (AccessDenied) for Start and still stops a pen with Stop;
#    ReloadLimits by a non-admin is refused.
. /needled-vm/guest/lib.sh
log "d. polkit: $OPERATOR (in $CLINIC_GROUP) and $OUTSIDER (not), no logind session for either"
trap session_cleanup EXIT

check "pen ready" pen_ready
check "no clinic rules in force yet" clinic_rules_remove
check "a fresh cartridge" fresh_cartridge
out=$(as_user "$OPERATOR" needlectl --no-ask-password arm "$PEN_SERIAL" acne-scars-cheeks 2>&1)
log "without the rules, $OPERATOR arms: $out"
check "... refused: polkit's defaults give a user without an active session nothing" has "$out" AccessDenied
check "... by polkit's answer, not for want of one" not has "$out" 'did not answer\|could not be asked\|identity could not'


check "install the example rules (from $CLINIC_RULES_EXAMPLE)" clinic_rules_install

# a member runs a whole (short) treatment to its end
out=$(as_user "$OPERATOR" needlectl --no-ask-password --json run "$PEN_SERIAL" --profile "$SHORT_PROFILE" --label vm-d 2>&1)
rc=$?
log "$OPERATOR: needlectl run (exit $rc):"; echo "$out" | sed 's/^/    /'
expect "$OPERATOR's treatment ran" "$rc" 0
sid=$(echo "$out" | jq -r 'select(.event == "session-ended") | .session_id' 2>/dev/null | tail -n 1)
reason=$(echo "$out" | jq -r 'select(.event == "session-ended") | .reason' 2>/dev/null | tail -n 1)
expect "it ended at the profile's duration" "$reason" completed
hist=$(as_user "$OPERATOR" needlectl --no-ask-password --json history --limit 5 2>/run/needled-vm-d-history.err)
rc=$?
[ "$rc" = 0 ] || log "$OPERATOR: needlectl history (exit $rc): $(cat /run/needled-vm-d-history.err)"
check "$OPERATOR reads the history" jq -e . <<<"$hist"
expect "the ledger's entry: reason" "$(echo "$hist" | jq -r --arg id "$sid" '.[] | select(.id == $id) | .reason')" completed
expect "the ledger's entry: owner" "$(echo "$hist" | jq -r --arg id "$sid" '.[] | select(.id == $id) | .owner_uid')" "$(id -u "$OPERATOR")"

# an outsider cannot start, arm or read; it can stop
check "a fresh cartridge" fresh_cartridge
check "$OPERATOR arms the pen" as_user "$OPERATOR" needlectl --no-ask-password arm "$PEN_SERIAL" acne-scars-cheeks
out=$(as_user "$OUTSIDER" needlectl --no-ask-password start "$PEN_SERIAL" 2>&1)
log "$OUTSIDER: start: $out"
check "$OUTSIDER's Start refused with AccessDenied" has "$out" 'org.freedesktop.DBus.Error.AccessDenied'
expect "the pen stays armed" "$(pen_value State)" armed
out=$(as_user "$OUTSIDER" busctl --system call org.needled "$PEN_PATH" org.needled1.Pen Start 'a{sv}' 0 2>&1)
log "$OUTSIDER: busctl Pen.Start: $out"
check "... also through busctl" has "$out" 'Access denied\|AccessDenied\|not authorized\|Not authorized'
out=$(as_user "$OUTSIDER" needlectl --no-ask-password history 2>&1)
check "$OUTSIDER cannot read the history" has "$out" AccessDenied

mark=$(motor_mark)
check "$OPERATOR starts a session" session_begin "$OPERATOR" acne-scars-cheeks vm-d-stop
out=$(as_user "$OUTSIDER" needlectl --no-ask-password stop "$PEN_SERIAL" 2>&1)
rc=$?
log "$OUTSIDER: stop (exit $rc): $out"
expect "$OUTSIDER's Stop succeeds" "$rc" 0
check "$OPERATOR's needlectl run ends" session_end_wait 15
expect "the session ended" "$(session_reason)" stopped
stop=$(motor_stop_line "$mark")
log "motor log: $stop"
check "the motor stopped by the host's command" has "$stop" 'cause=host'

digest=$(mgr_get LimitsDigest)
for user in "$OUTSIDER" "$OPERATOR"; do
	out=$(as_user "$user" needlectl --no-ask-password reload-limits 2>&1)
	rc=$?
	log "$user: reload-limits (exit $rc): $out"
	check "$user's ReloadLimits refused (exit $rc)" test "$rc" != 0
	check "... by polkit" has "$out" 'AccessDenied\|InteractiveAuthorizationRequired'
done
expect "the limits in force are unchanged" "$(mgr_get LimitsDigest)" "$digest"
finish
