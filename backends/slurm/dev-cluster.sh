#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for developing and testing the slurm backend.
#
#   backends/slurm/dev-cluster.sh start [DIR]   start munged, slurmctld and slurmd; print SLURM_CONF
#   backends/slurm/dev-cluster.sh stop  [DIR]   stop all three (only the processes it started)
#   backends/slurm/dev-cluster.sh status [DIR]  exit 0 if the controller answers
#   backends/slurm/dev-cluster.sh env [DIR]     print `export SLURM_CONF=...` for your shell
#
# Everything lives in DIR (default $FANOUT_SLURM_DEV_DIR, else /tmp/fanout-slurm-dev): the munge
# key and socket, slurm.conf, cgroup.conf, state, spool, logs and pid files. Nothing is written to
# /etc, no system service is touched, and the ports (16817/16818 unless FANOUT_SLURM_CTLD_PORT /
# FANOUT_SLURM_SLURMD_PORT say otherwise) stay clear of a real installation's 6817/6818. Point
# clients at it with SLURM_CONF=DIR/etc/slurm.conf (the munge socket path is in that file).
#
# Choices, and why:
# - No slurmdbd: accounting_storage/none. A MariaDB server per CI run costs more than it tests;
#   the backend's squeue mode (plus the job's own exit file) covers status, and jobcomp/filetxt
#   keeps a history that `sacct --completion` reads.
# - proctrack/linuxproc and task/none: no cgroup setup needed (containers, VMs without
#   delegation); Slurm still kills every descendant of a job when it ends.
# - The node advertises max(nproc, 8) CPUs (config_overrides): jobs here mostly sleep, and a test
#   suite on a 2-core runner should not queue behind its own idle jobs.
# - Short KillWait/MinJobAge-friendly timings so that cancels and time limits finish in seconds.
#
# Needs root (slurmd launches jobs as their owner) and Debian's slurm-wlm + munge packages.
set -euo pipefail

cmd="${1:-}"
DIR="${2:-${FANOUT_SLURM_DEV_DIR:-/tmp/fanout-slurm-dev}}"
CTLD_PORT="${FANOUT_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${FANOUT_SLURM_SLURMD_PORT:-16818}"
NODE=fanout-dev-node
CONF="$DIR/etc/slurm.conf"

die() { echo "dev-cluster: $*" >&2; exit 1; }

need() {
  for prog in munged mungekey slurmctld slurmd sinfo; do
    command -v "$prog" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$prog" >/dev/null 2>&1 \
      || die "$prog not found: apt-get install -y slurm-wlm munge"
  done
  [ "$(id -u)" -eq 0 ] || die "must run as root (slurmd starts jobs as their owner)"
}

alive() {  # alive PIDFILE: the process it names is running
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_config() {
  local host cpus mem
  host="$(hostname -s)"
  cpus="$(nproc)"
  [ "$cpus" -lt 8 ] && cpus=8
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  mkdir -p "$DIR"/{etc,munge,state,spool,log,run}
  chmod 700 "$DIR/munge"
  cat >"$CONF" <<EOF
# Written by backends/slurm/dev-cluster.sh; regenerated on every start.
ClusterName=fanoutdev
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
LaunchParameters=use_interactive_step
KillWait=5
MinJobAge=300
MessageTimeout=5
SlurmctldTimeout=10
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/etc/cgroup.conf" <<EOF
# Unused while ProctrackType=proctrack/linuxproc and TaskPlugin=task/none; present so that a
# switch to proctrack/cgroup has a file to edit.
CgroupPlugin=autodetect
EOF
  [ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
  chmod 600 "$DIR/munge/munge.key"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit="$1" what="$2"; shift 2
  local end=$(( SECONDS + limit ))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || die "$what did not come up within ${limit}s (logs: $DIR/log)"
    sleep 0.2
  done
}

node_idle() {
  sinfo -h -n "$NODE" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'
}

start() {
  need
  export PATH="$PATH:/usr/sbin:/sbin"
  write_config
  export SLURM_CONF="$CONF"
  if ! alive "$DIR/run/munged.pid"; then
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
      --seed-file="$DIR/munge/munged.seed"
  fi
  wait_for 10 munged test -S "$DIR/munge/munge.socket"
  if ! alive "$DIR/run/slurmctld.pid"; then
    # -i: ignore state from an earlier run of this directory (a fresh cluster every start).
    slurmctld -f "$CONF" -i </dev/null
  fi
  wait_for 30 slurmctld scontrol ping
  if ! alive "$DIR/run/slurmd.pid"; then
    slurmd -f "$CONF" -N "$NODE" </dev/null
  fi
  wait_for 30 "slurmd ($NODE)" node_idle
  echo "SLURM_CONF=$CONF"
}

stop() {
  export PATH="$PATH:/usr/sbin:/sbin"
  local name pidfile pid
  for name in slurmd slurmctld munged; do
    pidfile="$DIR/run/$name.pid"
    alive "$pidfile" || continue
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF="$CONF" scontrol ping ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env [DIR]" >&2; exit 2 ;;
esac
