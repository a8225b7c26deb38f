#!/usr/bin/env bash
# A single-node Garage (S3-compatible object storage) on 127.0.0.1 for the object
# storage backend of `lazyblk store` (tests/s3_store.rs, trying it by hand).
#
#   scripts/garage.sh start DIR   installs garage when it is not on PATH (cargo install,
#                                 about 8 minutes on 2 cores), writes DIR/garage.toml,
#                                 starts the server, assigns the layout, creates bucket
#                                 "lazyblk" and a key, and prints one line to eval:
#                                 export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
#                                 LAZYBLK_S3_ENDPOINT=http://127.0.0.1:PORT
#   scripts/garage.sh stop DIR    stops the server started in DIR.
#
# A line of progress goes to stderr (the CLI's own output to DIR/setup.log), the export
# line alone to stdout (and to DIR/env).
set -euo pipefail

BUCKET=lazyblk
KEY_NAME=lazyblk-test
# How long the server gets to answer its CLI after starting (it opens its database
# and binds two ports; a loaded CI machine is slow).
START_TIMEOUT_SECS=30

usage() {
  echo "usage: $0 start DIR | stop DIR" >&2
  exit 2
}

log() { echo "garage.sh: $*" >&2; }

# Runs a garage CLI step with its chatty output in DIR/setup.log, shown on failure.
SETUP_LOG=/dev/null
quiet() {
  "$@" >>"$SETUP_LOG" 2>&1 || {
    log "failed: $*"
    tail -20 "$SETUP_LOG" >&2
    exit 1
  }
}

# A TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ensure_garage() {
  if command -v garage >/dev/null; then
    return
  fi
  log "garage is not on PATH; cargo install garage --locked (about 8 minutes on 2 cores)"
  cargo install garage --locked >&2
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  command -v garage >/dev/null || { log "garage is still not on PATH after cargo install"; exit 1; }
}

# Starts the server and sets it up once; exits non-zero (in its subshell) on failure.
start_once() {
  local dir=$1
  mkdir -p "$dir/meta" "$dir/data"
  dir=$(cd "$dir" && pwd)
  local cfg=$dir/garage.toml rpc_port s3_port secret
  SETUP_LOG=$dir/setup.log
  rpc_port=$(free_port)
  s3_port=$(free_port)
  secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  cat >"$cfg" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"
EOF
  garage -c "$cfg" server </dev/null >"$dir/garage.log" 2>&1 &
  echo $! >"$dir/garage.pid"
  log "server pid $(cat "$dir/garage.pid"), S3 on 127.0.0.1:$s3_port, log $dir/garage.log"

  local node="" deadline=$((SECONDS + START_TIMEOUT_SECS))
  until node=$(garage -c "$cfg" node id -q 2>/dev/null); do
    if ((SECONDS > deadline)) || ! kill -0 "$(cat "$dir/garage.pid")" 2>/dev/null; then
      log "the server did not come up; its log:"
      tail -20 "$dir/garage.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  node=${node%%@*}
  quiet garage -c "$cfg" layout assign -z dc1 -c 1G "$node"
  quiet garage -c "$cfg" layout apply --version 1
  quiet garage -c "$cfg" bucket create "$BUCKET"
  local key_info key_id key_secret
  key_info=$(garage -c "$cfg" key create "$KEY_NAME")
  key_id=$(awk '/Key ID/ {print $NF}' <<<"$key_info")
  key_secret=$(awk '/Secret key/ {print $NF}' <<<"$key_info")
  [ -n "$key_id" ] && [ -n "$key_secret" ] || { log "cannot read the key from: $key_info"; exit 1; }
  quiet garage -c "$cfg" bucket allow --read --write --owner "$BUCKET" --key "$KEY_NAME"
  local line="export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$key_secret LAZYBLK_S3_ENDPOINT=http://127.0.0.1:$s3_port"
  echo "$line" >"$dir/env"
  echo "$line"
}

# Two starts at once (tests run side by side) can be handed the same free port between
# free_port and the server's bind; the setup then talks to the other server and fails.
# Such a start is stopped and made again from scratch, with new ports.
START_ATTEMPTS=3

start() {
  local dir=$1 attempt
  ensure_garage
  for attempt in $(seq "$START_ATTEMPTS"); do
    if (start_once "$dir"); then
      return 0
    fi
    stop "$dir"
    rm -rf "${dir:?}/meta" "${dir:?}/data"
    ((attempt < START_ATTEMPTS)) && log "start failed; trying again with new ports"
  done
  log "could not start after $START_ATTEMPTS attempts"
  exit 1
}

stop() {
  local dir=$1 pid
  [ -f "$dir/garage.pid" ] || { log "no server started in $dir"; return 0; }
  pid=$(cat "$dir/garage.pid")
  if kill "$pid" 2>/dev/null; then
    # Give it a moment to close its database, then make sure.
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/garage.pid"
  log "stopped"
}

[ $# -eq 2 ] || usage
case $1 in
  start) start "$2" ;;
  stop) stop "$2" ;;
  *) usage ;;
esac
