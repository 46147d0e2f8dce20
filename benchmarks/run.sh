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

# The project's venv if there is one, else python3.
python=python3
cands=()
[ -n "${VIRTUAL_ENV:-}" ] && cands+=("$VIRTUAL_ENV/bin/python")
for cand in "${cands[@]}" "$root/.venv/bin/python" "$root/venv/bin/python" /work/venv/bin/python; do
    if [ -x "$cand" ]; then
        python="$cand"
        break
    fi
done

exec "$python" "$here/run.py" "$@"
