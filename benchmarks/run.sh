#!/usr/bin/env bash
# One command: install the benchmark's tools if missing, then run
# benchmarks/run.py (direct vs ssh -R vs rtunnel, all on 127.0.0.1).
# Arguments are passed on, e.g.: benchmarks/run.sh --quick --only direct,ssh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx)
command -v sshd >/dev/null || need+=(openssh-server)
{ command -v ssh >/dev/null && command -v ssh-keygen >/dev/null; } || need+=(openssh-client)

if ((${#need[@]})); then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
    echo "installing: ${need[*]}" >&2
    if ! { "${sudo[@]}" apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"; } >&2; then
        echo "warning: could not install ${need[*]}; those cells will read n/a" >&2
    fi
fi

# The project's .venv, made if missing, with the current tree installed
# (the benchmark runs the installed rtunnel_server / rtunnel_client).
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv" >&2
    python3 -m venv "$venv" >&2
fi
echo "installing rtunnel from $root into $venv" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$root" >&2
python="$venv/bin/python"

if [ "${1:-}" = hostnames ]; then  # hostname routing (#15): --http/--https beside a port tunnel
    shift
    exec "$python" "$here/hostnames.py" "$@"
fi
exec "$python" "$here/run.py" "$@"
