#!/usr/bin/env bash
# One command that shows a three-member rtunnel fleet on this machine (docs/fleet.md):
#
#   etcd (Debian's etcd-server, installed with apt if missing) on 127.0.0.1:$FLEET_DEMO_ETCD_PORT
#   members m1, m2, m3: rtunnel_server --fleet-etcd ... on 127.0.0.1, .2, .3 (control port
#     $FLEET_DEMO_CONTROL_PORT, member links $FLEET_DEMO_LINK_PORT, each with its own
#     --public-host), member certificates from 'rtunnel_server fleet-init/fleet-add-member'
#   sample web page on 127.0.0.1:$FLEET_DEMO_TARGET_PORT (python3 -m http.server)
#   haproxy (if installed, or installable with apt) on 127.0.0.1:$FLEET_DEMO_HAPROXY_PORT in front
#     of the three control ports (scripts/fleet-haproxy.cfg)
#   rtunnel_client through haproxy (without it: at m1) asks for port $FLEET_DEMO_PUBLIC_PORT -> the page
#   curl http://127.0.0.N:$FLEET_DEMO_PUBLIC_PORT/ at each member reaches the page.
#
# Usage: bash scripts/fleet-demo.sh [--keep]
#   --keep   leave everything running and print KEY=VALUE lines a script can read:
#            ETCD_PID, ETCD_URL, MEMBER1_PID..MEMBER3_PID, MEMBER1_ADDRESS..MEMBER3_ADDRESS
#            (the address visitors use), MEMBER1_CONTROL..MEMBER3_CONTROL, CLIENT_PID,
#            SERVICE_PID, PUBLIC_PORT, HOME_MEMBER (1-3: the client's session's home),
#            FINGERPRINT, WORK_DIR, CLIENT_SERVER (what the client's -c names),
#            HAPROXY_PID (empty without haproxy). Kill the home member: the client moves
#            to another member through haproxy and the port is served again in about 1 s.
# Environment: FLEET_DEMO_ETCD_PORT (22379), FLEET_DEMO_ETCD_PEER_PORT (the next one),
#   FLEET_DEMO_CONTROL_PORT (19070), FLEET_DEMO_LINK_PORT (19071),
#   FLEET_DEMO_PUBLIC_PORT (4100), FLEET_DEMO_TARGET_PORT (3100), FLEET_DEMO_HAPROXY_PORT
#   (19069), FLEET_DEMO_HAPROXY=0 (no haproxy: the client at m1), PYTHON (python3).
# Everything is stopped (and the temp dir removed) when the script exits, unless --keep.
set -euo pipefail

ETCD_PORT=${FLEET_DEMO_ETCD_PORT:-22379}
ETCD_PEER_PORT=${FLEET_DEMO_ETCD_PEER_PORT:-$((ETCD_PORT + 1))}
CONTROL_PORT=${FLEET_DEMO_CONTROL_PORT:-19070}
LINK_PORT=${FLEET_DEMO_LINK_PORT:-19071}
PUBLIC_PORT=${FLEET_DEMO_PUBLIC_PORT:-4100}
TARGET_PORT=${FLEET_DEMO_TARGET_PORT:-3100}
HAPROXY_PORT=${FLEET_DEMO_HAPROXY_PORT:-19069}
USE_HAPROXY=${FLEET_DEMO_HAPROXY:-1}
PYTHON=${PYTHON:-python3}
KEEP=0

for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "fleet-demo: unknown argument '$arg' (only --keep is known)" >&2; exit 64 ;;
    esac
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
ADDRESSES=(127.0.0.1 127.0.0.2 127.0.0.3)

SCRIPT=fleet-demo
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
trap cleanup EXIT

# ------------------------------------------------------------------ checks

check_python

declare -A PORT_USE=()
for use in ETCD_PORT ETCD_PEER_PORT CONTROL_PORT LINK_PORT PUBLIC_PORT TARGET_PORT HAPROXY_PORT; do
    port=${!use}
    if [ -n "${PORT_USE[$port]:-}" ]; then
        die "$use and ${PORT_USE[$port]} are both port $port; each needs its own port. Choose another with FLEET_DEMO_$use."
    fi
    PORT_USE[$port]=$use
done
for port in "$ETCD_PORT" "$ETCD_PEER_PORT" "$TARGET_PORT" "$HAPROXY_PORT"; do
    if port_busy 127.0.0.1 "$port"; then
        die "port $port on 127.0.0.1 is already in use (an earlier 'fleet-demo.sh --keep'?). Stop that program or choose other ports with FLEET_DEMO_ETCD_PORT / FLEET_DEMO_TARGET_PORT."
    fi
done
for address in "${ADDRESSES[@]}"; do
    for port in "$CONTROL_PORT" "$LINK_PORT" "$PUBLIC_PORT"; do
        if port_busy "$address" "$port"; then
            die "port $port on $address is already in use (an earlier 'fleet-demo.sh --keep'?). Stop that program or choose other ports with FLEET_DEMO_CONTROL_PORT / FLEET_DEMO_LINK_PORT / FLEET_DEMO_PUBLIC_PORT."
        fi
    done
done

# ------------------------------------------------------------------ install

SUDO=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else SUDO=(false); fi
fi
apt_install() {  # apt_install PACKAGE...: true if apt installed them
    command -v apt-get >/dev/null && "${SUDO[@]}" apt-get update -qq </dev/null \
        && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@" </dev/null
}
PATH="$PATH:/usr/sbin:/sbin"  # haproxy lives in /usr/sbin
ETCD=$(command -v etcd || true)
if [ -z "$ETCD" ]; then
    say "installing etcd (apt-get install etcd-server)"
    apt_install etcd-server && ETCD=$(command -v etcd || true)
    [ -n "$ETCD" ] || die "etcd is not installed and could not be installed here (not root, or no apt). Install it: sudo apt-get install etcd-server (or put an etcd 3.4+ binary on PATH)"
fi
HAPROXY=""
if [ "$USE_HAPROXY" = 1 ]; then
    HAPROXY=$(command -v haproxy || true)
    if [ -z "$HAPROXY" ]; then
        say "installing haproxy (apt-get install haproxy)"
        apt_install haproxy && HAPROXY=$(command -v haproxy || true)
        [ -n "$HAPROXY" ] || echo "fleet-demo: haproxy is not installed and could not be (not root, or no apt): the client connects to m1 directly (no failover to another member)" >&2
    fi
fi

install_rtunnel

# ------------------------------------------------------------------ run

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rtunnel-fleet-demo.XXXXXX")
mkdir -p "$WORK/www"
cat > "$WORK/www/index.html" <<EOF
<!doctype html>
<title>rtunnel fleet demo</title>
<h1>Hello through the rtunnel fleet</h1>
<p>This page is served on 127.0.0.1:$TARGET_PORT and reached through port $PUBLIC_PORT at any member.</p>
EOF

start() {  # start NAME COMMAND...: run in WORK/NAME-cwd, output to WORK/NAME.log; sets STARTED
    mkdir -p "$WORK/$1-cwd"
    local name=$1
    shift
    (cd "$WORK/$name-cwd" && exec "$@") </dev/null >"$WORK/$name.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
}

ETCD_URL="http://127.0.0.1:$ETCD_PORT"
say "starting etcd ($ETCD) on $ETCD_URL"
start etcd "$ETCD" --name demo --data-dir "$WORK/etcd" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "demo=http://127.0.0.1:$ETCD_PEER_PORT" --log-level warn
ETCD_PID=$STARTED
etcd_ready() { "$VENV/bin/python" -c 'import sys, urllib.request; sys.exit(b"true" not in urllib.request.urlopen(sys.argv[1] + "/health", timeout=1).read())' "$ETCD_URL" 2>/dev/null; }
wait_for 30 "$ETCD_PID" "etcd" etcd_ready || { show_log etcd "$WORK/etcd.log" 40; die "etcd did not start"; }

say "fleet CA and member certificates (rtunnel_server fleet-init, fleet-add-member m1 m2 m3)"
"$VENV/bin/rtunnel_server" fleet-init -s "$WORK/ca" --fleet demo >/dev/null
for i in 1 2 3; do
    "$VENV/bin/rtunnel_server" fleet-add-member "m$i" -s "$WORK/ca" --out "$WORK/m$i" >/dev/null
done
# one server certificate for the three members: a client pins one fingerprint, whichever member it reaches
"$VENV/bin/python" -c 'import sys; from pathlib import Path; from rtunnel.tls import load_server_identity; load_server_identity(Path(sys.argv[1]))' "$WORK/m1"
cp "$WORK/m1/server.crt" "$WORK/m1/server.key" "$WORK/m2/"
cp "$WORK/m1/server.crt" "$WORK/m1/server.key" "$WORK/m3/"
TOKEN=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')
printf '%s\n' "$TOKEN" >"$WORK/token"
chmod 600 "$WORK/token"

MEMBER_PIDS=()
for i in 1 2 3; do
    address=${ADDRESSES[$((i - 1))]}
    say "starting member m$i: rtunnel_server --interface $address --port $CONTROL_PORT --public-host $address --fleet-etcd $ETCD_URL --fleet-member m$i --fleet-listen tcp:$LINK_PORT:interface=$address --state-dir $WORK/m$i --token ..."
    start "m$i" "$VENV/bin/rtunnel_server" --interface "$address" --port "$CONTROL_PORT" --public-host "$address" \
        --state-dir "$WORK/m$i" --token "$TOKEN" \
        --fleet-etcd "$ETCD_URL" --fleet-member "m$i" --fleet-listen "tcp:$LINK_PORT:interface=$address"
    MEMBER_PIDS+=("$STARTED")
done
for i in 1 2 3; do
    member_ready() { grep -q 'rtunnel server listening' "$WORK/m$i.log"; }
    wait_for 30 "${MEMBER_PIDS[$((i - 1))]}" "member m$i start" member_ready \
        || { show_log "m$i" "$WORK/m$i.log" 40; die "member m$i did not start"; }
done
FINGERPRINT=$(grep -o 'fingerprint sha256:[0-9a-f]\{64\}' "$WORK/m1.log" | head -n 1 | cut -d' ' -f2)

say "starting the sample service: python3 -m http.server on 127.0.0.1:$TARGET_PORT"
start service "$VENV/bin/python" -m http.server "$TARGET_PORT" --bind 127.0.0.1 --directory "$WORK/www"
SERVICE_PID=$STARTED
wait_for 15 "$SERVICE_PID" "sample service" port_busy 127.0.0.1 "$TARGET_PORT" \
    || { show_log service "$WORK/service.log"; die "the sample service did not start"; }

HAPROXY_PID=""
CLIENT_SERVER="127.0.0.1:$CONTROL_PORT"
if [ -n "$HAPROXY" ]; then
    say "starting haproxy on 127.0.0.1:$HAPROXY_PORT in front of the members' control ports (scripts/fleet-haproxy.cfg)"
    RTUNNEL_FRONT="127.0.0.1:$HAPROXY_PORT" RTUNNEL_HAPROXY_STATS="$WORK/haproxy-stats.sock" \
        RTUNNEL_MEMBER1="127.0.0.1:$CONTROL_PORT" RTUNNEL_MEMBER2="127.0.0.2:$CONTROL_PORT" \
        RTUNNEL_MEMBER3="127.0.0.3:$CONTROL_PORT" start haproxy "$HAPROXY" -db -f "$ROOT/scripts/fleet-haproxy.cfg"
    HAPROXY_PID=$STARTED
    wait_for 15 "$HAPROXY_PID" "haproxy" port_busy 127.0.0.1 "$HAPROXY_PORT" \
        || { show_log haproxy "$WORK/haproxy.log" 20; die "haproxy did not start"; }
    CLIENT_SERVER="127.0.0.1:$HAPROXY_PORT"
fi

# -f PORT without an address: one claim fleet-wide, served by every member on its own --public-host
say "starting rtunnel_client -c $CLIENT_SERVER -f $PUBLIC_PORT -t $TARGET_PORT --token ... --fingerprint $FINGERPRINT"
start client "$VENV/bin/rtunnel_client" -c "$CLIENT_SERVER" -f "$PUBLIC_PORT" -t "$TARGET_PORT" \
    --token "$TOKEN" --fingerprint "$FINGERPRINT"
CLIENT_PID=$STARTED
tunnel_ready() { grep -q "tunnel ready" "$WORK/client.log"; }
wait_for 30 "$CLIENT_PID" "tunnel on port $PUBLIC_PORT" tunnel_ready || {
    show_log m1 "$WORK/m1.log" 40
    show_log client "$WORK/client.log" 40
    die "the tunnel did not come up"
}

# the session's home, as etcd has it (claims/tcp/default/PORT names the member)
HOME_MEMBER=$("$VENV/bin/python" - "$ETCD_URL" "$PUBLIC_PORT" <<'EOF'
import base64, json, sys, urllib.request
key = base64.b64encode(f"/rtunnel/claims/tcp/default/{sys.argv[2]}".encode()).decode()
request = urllib.request.Request(sys.argv[1] + "/v3/kv/range", json.dumps({"key": key}).encode())
kvs = json.loads(urllib.request.urlopen(request, timeout=5).read()).get("kvs", [])
print(json.loads(base64.b64decode(kvs[0]["value"]))["member"][1:] if kvs else "")
EOF
)
[ -n "$HOME_MEMBER" ] || die "etcd holds no claim for port $PUBLIC_PORT"

fetch() {  # fetch URL: the page, or nothing
    if command -v curl >/dev/null; then
        curl -s --max-time 5 "$1" || true
    else
        "$VENV/bin/python" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1" 2>/dev/null || true
    fi
}
FAILED=0
for i in 1 2 3; do
    url="http://${ADDRESSES[$((i - 1))]}:$PUBLIC_PORT/"
    role="an edge: carried to m$HOME_MEMBER over a member link"
    [ "$i" = "$HOME_MEMBER" ] && role="the session's home"
    say "curl $url  (member m$i, $role)"
    PAGE=""
    for _ in $(seq 50); do  # an edge opens the port once its etcd watch sees the claim: a moment
        PAGE=$(fetch "$url")
        case "$PAGE" in *"Hello through the rtunnel fleet"*) break ;; esac
        sleep 0.2
    done
    printf '%s\n' "$PAGE"
    case "$PAGE" in
        *"Hello through the rtunnel fleet"*) echo "ok: member m$i served the tunnel" ;;
        *) echo "member m$i did not serve the tunnel" >&2; FAILED=1 ;;
    esac
done

echo
for i in 1 2 3; do show_log "m$i" "$WORK/m$i.log" 6; echo; done
show_log client "$WORK/client.log" 6
echo
[ "$FAILED" = 0 ] || die "a visitor did not reach the tunnel at every member"
say "it works: port $PUBLIC_PORT reached 127.0.0.1:$TARGET_PORT at each of the three members (home: m$HOME_MEMBER)"

if [ "$KEEP" = 1 ]; then
    cat <<EOF

Left running (--keep). Try: curl http://127.0.0.2:$PUBLIC_PORT/
Stop:    kill $CLIENT_PID $HAPROXY_PID $SERVICE_PID ${MEMBER_PIDS[*]} $ETCD_PID; rm -rf $WORK
ETCD_PID=$ETCD_PID
ETCD_URL=$ETCD_URL
MEMBER1_PID=${MEMBER_PIDS[0]}
MEMBER2_PID=${MEMBER_PIDS[1]}
MEMBER3_PID=${MEMBER_PIDS[2]}
MEMBER1_ADDRESS=${ADDRESSES[0]}:$PUBLIC_PORT
MEMBER2_ADDRESS=${ADDRESSES[1]}:$PUBLIC_PORT
MEMBER3_ADDRESS=${ADDRESSES[2]}:$PUBLIC_PORT
MEMBER1_CONTROL=${ADDRESSES[0]}:$CONTROL_PORT
MEMBER2_CONTROL=${ADDRESSES[1]}:$CONTROL_PORT
MEMBER3_CONTROL=${ADDRESSES[2]}:$CONTROL_PORT
CLIENT_PID=$CLIENT_PID
SERVICE_PID=$SERVICE_PID
PUBLIC_PORT=$PUBLIC_PORT
HOME_MEMBER=$HOME_MEMBER
FINGERPRINT=$FINGERPRINT
CLIENT_SERVER=$CLIENT_SERVER
HAPROXY_PID=$HAPROXY_PID
WORK_DIR=$WORK
EOF
else
    say "stopping everything"
fi
