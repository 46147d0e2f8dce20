#!/usr/bin/env bash
# One command that installs rtunnel into .venv and shows it working on loopback:
#
#   sample web page on 127.0.0.1:$QUICKSTART_TARGET_PORT (python3 -m http.server)
#   rtunnel_server  on 127.0.0.1:$QUICKSTART_CONTROL_PORT (state in a temp dir)
#   rtunnel_client  asks the server to open $QUICKSTART_PUBLIC_PORT -> the page
#   curl http://127.0.0.1:$QUICKSTART_PUBLIC_PORT/ goes through the tunnel.
#
# Usage: bash scripts/quickstart.sh [--keep] [--config]
#   --keep     leave the three processes running and print how to stop them
#   --config   start the client from a config file (client.toml, written in
#              the temp dir and shown) instead of flags
# Environment: QUICKSTART_CONTROL_PORT (19050), QUICKSTART_PUBLIC_PORT (4000),
#   QUICKSTART_TARGET_PORT (3000), PYTHON (python3).
# Everything is stopped (and the temp dir removed) when the script exits,
# unless --keep was given.
set -euo pipefail

CONTROL_PORT=${QUICKSTART_CONTROL_PORT:-19050}
PUBLIC_PORT=${QUICKSTART_PUBLIC_PORT:-4000}
TARGET_PORT=${QUICKSTART_TARGET_PORT:-3000}
PYTHON=${PYTHON:-python3}
KEEP=0
USE_CONFIG=0

for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        --config) USE_CONFIG=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "quickstart: unknown argument '$arg' (only --keep and --config are known)" >&2; exit 64 ;;
    esac
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"

SCRIPT=quickstart
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
trap cleanup EXIT

# ------------------------------------------------------------------ checks

check_python

for port in "$CONTROL_PORT" "$PUBLIC_PORT" "$TARGET_PORT"; do
    if port_busy 127.0.0.1 "$port"; then
        die "port $port on 127.0.0.1 is already in use (an earlier 'quickstart.sh --keep'?). Stop that program or choose other ports with QUICKSTART_CONTROL_PORT / QUICKSTART_PUBLIC_PORT / QUICKSTART_TARGET_PORT."
    fi
done

# ------------------------------------------------------------------ install

install_rtunnel

# ------------------------------------------------------------------ run

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rtunnel-quickstart.XXXXXX")
mkdir -p "$WORK/www" "$WORK/server-cwd" "$WORK/client-cwd"
cat > "$WORK/www/index.html" <<EOF
<!doctype html>
<title>rtunnel quick start</title>
<h1>Hello through rtunnel</h1>
<p>This page is served on 127.0.0.1:$TARGET_PORT and reached through the tunnel on port $PUBLIC_PORT.</p>
EOF

say "starting the sample service: python3 -m http.server on 127.0.0.1:$TARGET_PORT"
"$VENV/bin/python" -m http.server "$TARGET_PORT" --bind 127.0.0.1 --directory "$WORK/www" \
    </dev/null >"$WORK/service.log" 2>&1 &
SERVICE_PID=$!
PIDS+=("$SERVICE_PID")
wait_for 15 "$SERVICE_PID" "sample service" port_busy 127.0.0.1 "$TARGET_PORT" \
    || { show_log service "$WORK/service.log"; die "the sample service did not start"; }

say "starting rtunnel_server --port $CONTROL_PORT --interface 127.0.0.1 --state-dir $WORK/srv"
(cd "$WORK/server-cwd" && exec "$VENV/bin/rtunnel_server" --port "$CONTROL_PORT" --interface 127.0.0.1 \
    --state-dir "$WORK/srv") </dev/null >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
server_ready() { grep -q 'fingerprint sha256:' "$WORK/server.log" && [ -s "$WORK/srv/token" ]; }
wait_for 30 "$SERVER_PID" "server start" server_ready \
    || { show_log server "$WORK/server.log" 40; die "rtunnel_server did not start"; }

FINGERPRINT=$(grep -o 'fingerprint sha256:[0-9a-f]\{64\}' "$WORK/server.log" | head -n 1 | cut -d' ' -f2)
if [ -z "$FINGERPRINT" ]; then  # compute it: hex SHA-256 of the certificate's DER form
    FINGERPRINT=sha256:$("$VENV/bin/python" -c \
        'import hashlib, ssl, sys; print(hashlib.sha256(ssl.PEM_cert_to_DER_cert(open(sys.argv[1]).read())).hexdigest())' \
        "$WORK/srv/server.crt")
fi
TOKEN=$(tr -d '[:space:]' <"$WORK/srv/token")
echo "server certificate: $FINGERPRINT"
echo "token (from $WORK/srv/token): $TOKEN"

# -f 127.0.0.1:PORT keeps the demo's public port on loopback (plain -f PORT binds ::, every address)
if [ "$USE_CONFIG" = 1 ]; then
    cat >"$WORK/client.toml" <<TOML
server = "127.0.0.1:$CONTROL_PORT"
fingerprint = "$FINGERPRINT"
token_file = "$WORK/srv/token"

[[tunnel]]
forward = "127.0.0.1:$PUBLIC_PORT"
to = "localhost:$TARGET_PORT"
TOML
    say "starting rtunnel_client --config $WORK/client.toml:"
    cat "$WORK/client.toml"
    (cd "$WORK/client-cwd" && exec "$VENV/bin/rtunnel_client" --config "$WORK/client.toml") \
        </dev/null >"$WORK/client.log" 2>&1 &
else
    say "starting rtunnel_client -c 127.0.0.1:$CONTROL_PORT -f 127.0.0.1:$PUBLIC_PORT -t $TARGET_PORT --token ... --fingerprint $FINGERPRINT"
    (cd "$WORK/client-cwd" && exec "$VENV/bin/rtunnel_client" -c "127.0.0.1:$CONTROL_PORT" \
        -f "127.0.0.1:$PUBLIC_PORT" -t "$TARGET_PORT" --token "$TOKEN" --fingerprint "$FINGERPRINT") \
        </dev/null >"$WORK/client.log" 2>&1 &
fi
CLIENT_PID=$!
PIDS+=("$CLIENT_PID")
wait_for 30 "$CLIENT_PID" "tunnel on port $PUBLIC_PORT" port_busy 127.0.0.1 "$PUBLIC_PORT" || {
    show_log server "$WORK/server.log" 40
    show_log client "$WORK/client.log" 40
    die "the tunnel did not come up"
}

say "GET http://127.0.0.1:$PUBLIC_PORT/  (through the tunnel)"
if command -v curl >/dev/null; then
    PAGE=$(curl -s --max-time 10 "http://127.0.0.1:$PUBLIC_PORT/") || PAGE=""
else
    PAGE=$("$VENV/bin/python" -c \
        'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
        "http://127.0.0.1:$PUBLIC_PORT/") || PAGE=""
fi
printf '%s\n' "$PAGE"

echo
show_log server "$WORK/server.log"
echo
show_log client "$WORK/client.log"
echo

case "$PAGE" in
    *"Hello through rtunnel"*) say "it works: 127.0.0.1:$PUBLIC_PORT reached 127.0.0.1:$TARGET_PORT through rtunnel" ;;
    *) die "the page did not come through the tunnel" ;;
esac

if [ "$KEEP" = 1 ]; then
    cat <<EOF

Left running (--keep):
  sample service  pid $SERVICE_PID   127.0.0.1:$TARGET_PORT
  rtunnel_server  pid $SERVER_PID   control port 127.0.0.1:$CONTROL_PORT, log $WORK/server.log
  rtunnel_client  pid $CLIENT_PID   public port $PUBLIC_PORT, log $WORK/client.log
Try:     curl http://127.0.0.1:$PUBLIC_PORT/
Stop:    kill $CLIENT_PID $SERVER_PID $SERVICE_PID; rm -rf $WORK
EOF
else
    say "stopping everything"
fi
