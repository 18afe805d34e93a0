#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost for tests (Debian/Ubuntu, as root,
# no systemd needed). Idempotent: installs the Debian packages only when
# missing, writes /etc/slurm/slurm.conf only when absent or written by this
# script, and starts only the daemons that are not already answering.
#
#   sudo scripts/slurm/start.sh        # then: sinfo; sbatch ...; scripts/slurm/stop.sh
#
# Every daemon it starts is recorded in $TRAIT_SLURM_STATE_DIR/pids/NAME.pid
# (default /var/tmp/trait-discovery-slurm); scripts/slurm/stop.sh stops exactly
# those and nothing else. The last line printed is machine-readable:
#   STARTED=munged,slurmctld,slurmd     (empty when everything already ran)
#
# Choices for a cluster without systemd or cgroups: ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none, SelectType=select/cons_tres with CR_Core (memory is not a
# consumable resource and is not enforced). Job status: no accounting database;
# MinJobAge keeps finished jobs visible to `squeue --states=all` for an hour,
# which is what snakemake-executor-plugin-slurm's `--slurm-status-command squeue`
# needs (it falls back to sacct unless MinJobAge >= 3 x the first status-check
# delay). Finished jobs are also written to $STATE/log/jobcomp.log (jobcomp/filetxt).
#
# Environment:
#   TRAIT_SLURM_STATE_DIR   state, spool, logs and pid files   (/var/tmp/trait-discovery-slurm)
#   TRAIT_SLURM_MIN_CPUS    advertise at least this many CPUs   (2)
#   TRAIT_SLURM_MIN_MEM_MB  advertise at least this much memory (16000)
# The floors let rules that ask for 2 CPUs / 8 GB be scheduled on a small CI
# machine; the node is a test bed, so nothing is enforced.
set -euo pipefail

STATE=${TRAIT_SLURM_STATE_DIR:-/var/tmp/trait-discovery-slurm}
MIN_CPUS=${TRAIT_SLURM_MIN_CPUS:-2}
MIN_MEM_MB=${TRAIT_SLURM_MIN_MEM_MB:-16000}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by trait-discovery scripts/slurm/start.sh"
NODE=localhost
STARTED=()

say() { echo "slurm/start.sh: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts slurmctld/slurmd as root)"

# ------------------------------------------------------------------ install
need_install() {
    local bin
    for bin in slurmctld slurmd sbatch squeue scontrol munged munge unmunge; do
        command -v "$bin" >/dev/null 2>&1 || return 0
    done
    return 1
}

if need_install; then
    command -v apt-get >/dev/null 2>&1 || die "slurm/munge are missing and apt-get is not available"
    say "installing slurmctld slurmd slurm-client munge with apt-get"
    # Keep the packages' maintainer scripts from starting services: we start
    # (and track) the daemons ourselves below. Only a policy file we create is removed.
    policy_created=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_created=1
    fi
    packages=(slurmctld slurmd slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${packages[@]}" >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${packages[@]}" >&2
    fi
    if [[ $policy_created -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
    need_install && die "apt-get finished but a SLURM/munge program is still missing"
fi

mkdir -p "$STATE"/{pids,log,spool,statesave}

# ------------------------------------------------------------------ helpers
# A pid file holds "PID EXECUTABLE" (the resolved binary, e.g. /usr/sbin/slurmctld-wlm
# behind Debian's alternatives link), so a reused pid is never taken for the daemon.
# pid_alive NAME: true when NAME.pid names a live process still running that binary.
pid_alive() {
    local file="$STATE/pids/$1.pid" pid exe
    [[ -f $file ]] || return 1
    read -r pid exe <"$file"
    [[ $(readlink -f /proc/"$pid"/exe 2>/dev/null) == "$exe" ]]
}

# launch NAME LOG CMD...: start a foreground daemon in its own session and record its pid.
launch() {
    local name=$1 log=$2
    shift 2
    local exe
    exe=$(readlink -f "$(command -v "$name")")
    nohup setsid "$@" >>"$log" 2>&1 </dev/null &
    local pid=$!
    # setsid (and setpriv for munged) exec the daemon in place, so $! becomes the daemon.
    local i
    for i in $(seq 1 20); do
        [[ $(readlink -f /proc/"$pid"/exe 2>/dev/null) == "$exe" ]] && break
        sleep 0.1
    done
    [[ $(readlink -f /proc/"$pid"/exe 2>/dev/null) == "$exe" ]] || die "$name did not start; see $log"
    echo "$pid $exe" >"$STATE/pids/$name.pid"
    STARTED+=("$name")
    say "started $name (pid $pid, log $log)"
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD until it succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
    say "$what"
}

# ------------------------------------------------------------------ munge
munge_works() { munge -n | unmunge; }

if ! munge_works >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    pid_alive munged && die "munged (pid file $STATE/pids/munged.pid) runs but munge fails; see $STATE/log/munged.log"
    launch munged "$STATE/log/munged.log" \
        setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    wait_for 20 "munge answers" munge_works || die "munge does not answer; see $STATE/log/munged.log"
fi

# ------------------------------------------------------------------ slurm.conf
if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    # Someone else's SLURM: use it if it answers, never overwrite it.
    scontrol ping 2>/dev/null | grep -q "is UP" ||
        die "$CONF exists, was not written by this script, and its slurmctld does not answer"
    say "using the existing SLURM configured in $CONF"
    echo "STARTED=$(IFS=,; echo "${STARTED[*]}")"
    exit 0
fi

# What slurmd detects on this machine, raised to the floors above.
detected=$(slurmd -C 2>/dev/null | head -1)
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$detected")
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
[[ -n $cpus ]] || cpus=$(nproc)
[[ -n $mem ]] || mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
((cpus >= MIN_CPUS)) || cpus=$MIN_CPUS
((mem >= MIN_MEM_MB)) || mem=$MIN_MEM_MB

new_conf=$(mktemp)
cat >"$new_conf" <<EOF
$MARKER: a one-node test cluster.
# Re-running the script rewrites this file; delete it to hand /etc/slurm back.
ClusterName=traitlocal
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
StateSaveLocation=$STATE/statesave
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
mkdir -p /etc/slurm
if ! cmp -s "$new_conf" "$CONF" 2>/dev/null; then
    install -m 0644 "$new_conf" "$CONF"
    say "wrote $CONF (node $NODE: CPUs=$cpus RealMemory=$mem)"
    conf_changed=1
else
    conf_changed=0
fi
rm -f "$new_conf"

# ------------------------------------------------------------------ daemons
ctld_up() { scontrol ping | grep -q "is UP"; }
node_ready() { sinfo -h -N -n "$NODE" -o %T | grep -Eqx '(idle|mixed|allocated)'; }

if ctld_up 2>/dev/null; then
    if [[ $conf_changed -eq 1 ]]; then scontrol reconfigure >&2; fi
else
    pid_alive slurmctld && die "slurmctld (pid file $STATE/pids/slurmctld.pid) runs but does not answer; see $STATE/log/slurmctld.log"
    launch slurmctld "$STATE/log/slurmctld.stderr" /usr/sbin/slurmctld -D -i
    wait_for 30 "slurmctld answers" ctld_up || die "slurmctld does not answer; see $STATE/log/slurmctld.log"
fi

# slurmctld keeps calling a node idle for SlurmdTimeout after its slurmd died,
# so look for the process itself (ours by pid file, anyone's by name).
# (Zombies, state Z, do not count.)
slurmd_running() { pid_alive slurmd || ps -C slurmd -o stat= 2>/dev/null | grep -qv '^Z'; }

if ! slurmd_running; then
    launch slurmd "$STATE/log/slurmd.stderr" /usr/sbin/slurmd -D -N "$NODE"
fi
if ! wait_for 30 "node $NODE is ready" node_ready; then
    # A node left DOWN/DRAINED by an earlier run: resume it once.
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    wait_for 15 "node $NODE is ready" node_ready ||
        die "node $NODE is not ready: $(sinfo -h -N -o '%T %E' 2>&1); see $STATE/log/slurmd.log"
fi

echo "STARTED=$(IFS=,; echo "${STARTED[*]}")"
