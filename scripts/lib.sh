# Shared by scripts/quickstart.sh and scripts/fleet-demo.sh (sourced, not run).
# The sourcing script sets SCRIPT (its name in messages), PYTHON, KEEP, ROOT and
# VENV first; it appends every process it starts to PIDS and sets WORK to its
# temp dir. `trap cleanup EXIT` stops them all (unless --keep and success).

say() { printf '\n==> %s\n' "$*"; }
die() { printf '\n%s: %s\n' "$SCRIPT" "$*" >&2; exit 1; }

PIDS=()
WORK=""
cleanup() {
    local status=$?
    if [ "$KEEP" = 1 ] && [ "$status" = 0 ]; then
        return
    fi
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # wait up to 5 s, then insist
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$WORK" ]; then
        rm -rf "$WORK"
    fi
    if [ "$status" != 0 ]; then
        echo "$SCRIPT: FAILED (exit $status); everything it started has been stopped" >&2
    fi
}

check_python() {  # Python 3.11 or newer as $PYTHON, or a message saying what to install
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 or newer (or set PYTHON=...)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "rtunnel needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1)"
}

port_busy() {  # port_busy HOST PORT: true when something accepts connections there
    "$PYTHON" - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
PY
}

install_rtunnel() {  # rtunnel into $VENV: created if missing; an editable install of this checkout is kept
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        say "creating $VENV"
        rm -rf "$VENV"
        if ! "$PYTHON" -m venv "$VENV"; then
            rm -rf "$VENV"
            die "'$PYTHON -m venv' failed. On Debian/Ubuntu install the venv module first: apt-get install python3-venv"
        fi
    fi
    local installed_from
    installed_from=$("$VENV/bin/python" -c 'import os, rtunnel; print(os.path.dirname(os.path.dirname(os.path.realpath(rtunnel.__file__))))' 2>/dev/null || true)
    if [ "$installed_from" = "$(realpath "$ROOT")" ] && [ -x "$VENV/bin/rtunnel_server" ]; then
        say "rtunnel is installed in $VENV from this checkout (editable)"
    else
        say "installing rtunnel into $VENV (pip install .)"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$ROOT"
    fi
}

wait_for() {  # wait_for SECONDS PID DESCRIPTION COMMAND...: poll COMMAND while PID lives
    local seconds=$1 pid=$2 what=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$SCRIPT: the process for the $what exited" >&2
            return 2
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$SCRIPT: no $what within $seconds s" >&2
            return 1
        fi
        sleep 0.2
    done
}

show_log() {  # show_log NAME FILE [LINES]
    echo "---- $1 log ($2), last ${3:-15} lines ----"
    tail -n "${3:-15}" "$2" 2>/dev/null || true
}
