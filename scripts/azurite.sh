#!/usr/bin/env bash
# A local Azure Blob emulator (Azurite, from the npm registry) on 127.0.0.1, for the
# object-storage tests of `az://` stores.
#   scripts/azurite.sh start DIR CONTAINER   # prints: export AZURITE_BLOB_STORAGE_URL=...
#   scripts/azurite.sh stop DIR
# Installs azurite and @azure/storage-blob (to create the container) under
# ~/.cache/lazyblk-azurite the first time. Exits 2 when they cannot be installed.
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?directory}
prefix=${LAZYBLK_AZURITE_PREFIX:-$HOME/.cache/lazyblk-azurite}
case "$cmd" in
  start)
    container=${3:?container}
    if [ ! -x "$prefix/node_modules/.bin/azurite-blob" ]; then
      mkdir -p "$prefix"
      echo "azurite.sh: npm install azurite @azure/storage-blob" >&2
      npm install --silent --no-audit --no-fund --prefix "$prefix" azurite@3 @azure/storage-blob@12 >&2 || exit 2
    fi
    mkdir -p "$dir/data"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$prefix/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$port" \
      --location "$dir/data" --silent --skipApiVersionCheck >"$dir/azurite.log" 2>&1 &
    echo $! >"$dir/azurite.pid"
    for _ in $(seq 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      sleep 0.1
    done
    url="http://127.0.0.1:$port"
    # The well-known development account of the emulator.
    conn="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=$url/devstoreaccount1;"
    NODE_PATH="$prefix/node_modules" node -e '
      const { BlobServiceClient } = require("@azure/storage-blob");
      BlobServiceClient.fromConnectionString(process.argv[1])
        .getContainerClient(process.argv[2]).createIfNotExists()
        .then(() => process.exit(0), (e) => { console.error(e.message); process.exit(1); });
    ' "$conn" "$container" >&2
    echo "azurite.sh: blob service on $url, container $container" >&2
    echo "export AZURITE_BLOB_STORAGE_URL=$url"
    ;;
  stop)
    [ -f "$dir/azurite.pid" ] && kill "$(cat "$dir/azurite.pid")" 2>/dev/null || true
    ;;
esac
