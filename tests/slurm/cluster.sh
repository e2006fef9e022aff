#!/usr/bin/env bash
# A one-node Slurm cluster in DIR, for the tests and by hand (as root):
#   tests/slurm/cluster.sh start DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf   # then sbatch, squeue, scontrol, scancel talk to it
#   tests/slurm/cluster.sh stop DIR
# Needs Debian's slurmctld slurmd slurm-client munge (see .ci/run). State, spool, logs
# and pid files stay in DIR; the daemons listen on free ports, so clusters in other
# directories do not collide.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$dir/slurm.conf

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || {
            echo "$tool not found: apt-get install -y slurmctld slurmd slurm-client munge" >&2
            exit 1
        }
    done
    [[ $(id -u) -eq 0 ]] || { echo "$0 must run as root (munged, SlurmUser=root)" >&2; exit 1; }

    # munged: one per machine, shared with other clusters; started here only if none runs.
    if ! munge -n </dev/null >/dev/null 2>&1; then
        [[ -s /etc/munge/munge.key ]] || /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
        install -d -o munge -g munge -m 755 /run/munge
        runuser -u munge -- /usr/sbin/munged
        touch "$dir/munged.started"
    fi

    local host cpus
    host=$(hostname -s)
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it obeys OMP_NUM_THREADS
    mkdir -p "$dir/state" "$dir/spool"
    cat > "$conf" <<CONF
ClusterName=megamodtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
# A requeued job waits for its old credential to expire (default 120 s) and for the
# scheduler's next pass (default 60 s): short here, so a requeue test takes seconds.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1
# sbatch --wait polls every 2 s only while that is under MinJobAge / 2 (else 8 s, 32 s).
MinJobAge=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    slurmctld -f "$conf"
    slurmd -f "$conf"
    # Ready when the node is idle (slurmd registered with slurmctld).
    for _ in $(seq 100); do
        if [[ $(SLURM_CONF=$conf sinfo -h -o %t 2>/dev/null) == idle ]]; then
            echo "cluster up: export SLURM_CONF=$conf"
            return 0
        fi
        sleep 0.2
    done
    echo "the cluster did not come up; logs: $dir/slurmctld.log $dir/slurmd.log" >&2
    exit 1
}

# The pid in a pid file, if that process still runs.
running() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop() {
    local pidfile pid
    # Jobs first: their processes would outlive slurmd.
    if running "$dir/slurmctld.pid" >/dev/null; then
        SLURM_CONF=$conf scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 100); do
            [[ -z $(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null | head -n 1) ]] && break
            sleep 0.1
        done
    fi
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
        if pid=$(running "$pidfile"); then
            kill "$pid"
        fi
    done
    if [[ -e $dir/munged.started ]] && pid=$(running /run/munge/munged.pid); then
        kill "$pid"
    fi
    rm -f "$dir/munged.started"
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
        for _ in $(seq 50); do
            running "$pidfile" >/dev/null || break
            sleep 0.1
        done
    done
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
