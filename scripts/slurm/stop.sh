#!/usr/bin/env bash
# Stop the SLURM/munge daemons that scripts/slurm/start.sh started, and only those.
#
#   scripts/slurm/stop.sh                  # every daemon recorded in the state dir
#   scripts/slurm/stop.sh slurmd munged    # just these (if start.sh started them)
#
# A daemon is stopped only when $TRAIT_SLURM_STATE_DIR/pids/NAME.pid exists and
# that pid still runs the binary recorded there (so a reused pid is never signalled).
# Daemons started by anything else (systemd, another admin) are left alone.
# Order: slurmd, slurmctld, munged (clients before the auth service).
set -euo pipefail

STATE=${TRAIT_SLURM_STATE_DIR:-/var/tmp/trait-discovery-slurm}
say() { echo "slurm/stop.sh: $*" >&2; }

if [[ $# -gt 0 ]]; then
    wanted=" $* "
else
    wanted=" slurmd slurmctld munged "
fi

status=0
for name in slurmd slurmctld munged; do
    [[ $wanted == *" $name "* ]] || continue
    file="$STATE/pids/$name.pid"
    [[ -f $file ]] || continue
    read -r pid exe <"$file"
    if [[ -n $exe && $(readlink -f /proc/"$pid"/exe 2>/dev/null) == "$exe" ]]; then
        kill -TERM "$pid"
        # Gone (or a zombie whose parent has not reaped it yet): /proc/PID/exe no longer resolves.
        for _ in $(seq 1 100); do
            [[ $(readlink -f /proc/"$pid"/exe 2>/dev/null) == "$exe" ]] || break
            sleep 0.1
        done
        if [[ $(readlink -f /proc/"$pid"/exe 2>/dev/null) == "$exe" ]]; then
            say "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -KILL "$pid" || true
        fi
        say "stopped $name (pid $pid)"
    else
        say "$name (pid $pid) was no longer running"
    fi
    rm -f "$file"
done
exit $status
