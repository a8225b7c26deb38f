# Sourced by the kernel test's guest (scripts/kernel-test.sh) with the daemon running
# and no device attached: `attach --json` and `detach --json` over the real kernel
# print the documented fields (docs/commands.md: device, index, export, kind, link,
# state, size, read_only, connected, error, attached_at, survives_restart,
# connections), parsed by jq; a refusal with --json prints {"error", "status"}. Uses
# the guest's must, fail and log.

# The fields every device document has, with their JSON types (a|b: either).
device_fields='{"device": "string", "index": "number", "export": "string",
  "kind": "string", "link": "string", "state": "string", "size": "number",
  "read_only": "boolean", "connected": "boolean", "error": "null|string",
  "attached_at": "string", "survives_restart": "boolean", "connections": "number"}'

# Checks that file $1 holds one device document with exactly the documented fields,
# of their types, and that jq filter $2 holds of it.
check_device_json() {
  jq -e --argjson want "$device_fields" \
    '(keys_unsorted | sort) == ($want | keys | sort)
     and ([to_entries[] | .value as $v | $want[.key] | split("|") | any(. == ($v | type))]
          | all)' "$1" >/dev/null \
    || fail "$1 does not have the documented fields and types: $(cat "$1")"
  jq -e "$2" "$1" >/dev/null || fail "$1 does not satisfy $2: $(cat "$1")"
}

lazyblk attach base --json >/tmp/attach.json 2>/tmp/attach.err \
  || fail "attach base --json: $(cat /tmp/attach.err)"
check_device_json /tmp/attach.json \
  '.export == "base" and .kind == "template" and .read_only and .connected and .error == null
   and .state == "connected" and .connections == 1 and .size == 67108864
   and .device == "/dev/nbd\(.index)" and .link == "netlink" and .survives_restart
   and (.attached_at | length > 0)'
json_dev=$(jq -r .device /tmp/attach.json)
[ "$(cat "/sys/block/${json_dev#/dev/}/ro")" = 1 ] || fail "$json_dev is not read-only"
log "attach --json: $(tr -d ' \n' </tmp/attach.json)"

# The device is listed with the same document (status --devices --json).
lazyblk status --devices --json >/tmp/devices.json 2>/tmp/devices.err \
  || fail "status --devices --json: $(cat /tmp/devices.err)"
jq -e --slurpfile one /tmp/attach.json '. == $one' /tmp/devices.json >/dev/null \
  || fail "status --devices --json differs from attach --json: $(cat /tmp/devices.json)"

# A refusal with --json: the daemon's status and message, typed, on stdout; exit 1.
if lazyblk attach base --device "$json_dev" --json >/tmp/refused.json 2>/tmp/refused.err; then
  fail "attach on the attached $json_dev succeeded"
fi
jq -e '(keys_unsorted | sort) == ["error", "status"] and .status == 409
  and (.error | contains("already attached"))' /tmp/refused.json >/dev/null \
  || fail "a refused attach --json printed: $(cat /tmp/refused.json)"
[ "$(cat /tmp/refused.err)" = "error: $(jq -r .error /tmp/refused.json)" ] \
  || fail "the refusal's stderr and JSON differ: $(cat /tmp/refused.err)"

lazyblk detach "$json_dev" --json >/tmp/detach.json 2>/tmp/detach.err \
  || fail "detach $json_dev --json: $(cat /tmp/detach.err)"
check_device_json /tmp/detach.json \
  ".device == \"$json_dev\" and .export == \"base\" and .kind == \"template\""
wait_free "${json_dev#/dev/}" "after detach --json"
log "detach --json: $(tr -d ' \n' </tmp/detach.json)"
