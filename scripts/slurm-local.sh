#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the suite's SLURM tests and for trying
# `run_suite.py run SUITE` end to end without a site cluster.
#
#   bash scripts/slurm-local.sh up       install (Debian packages) if missing, configure, start, wait
#   bash scripts/slurm-local.sh down     stop the daemons this script started
#   bash scripts/slurm-local.sh status   daemons and `sinfo`
#
# Runs as root in a container without systemd: the daemons are started directly in the
# background. `up` is idempotent. It refuses to overwrite a slurm.conf it did not write, so a
# site's configuration is never touched.
#
# No accounting database: `sacct` does not work here. submitit only uses sacct to learn the state
# of jobs that died without writing their result, and bench.dispatch asks `squeue` instead.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by scripts/slurm-local.sh"
LOG_DIR=/var/log/slurm
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
NODE=$(hostname -s)

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() {  # pid_alive PIDFILE: the process named in PIDFILE is running
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  local need=()
  command -v slurmctld >/dev/null || need+=(slurmctld)
  command -v slurmd >/dev/null || need+=(slurmd)
  command -v sinfo >/dev/null || need+=(slurm-client)
  command -v munged >/dev/null || need+=(munge)
  [ ${#need[@]} -eq 0 ] && return
  command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d in containers refuses to start services at install time: we start them below
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

start_munge() {
  if [ ! -s "$MUNGE_KEY" ]; then
    log "creating a munge key"
    install -d -o munge -g munge -m 0700 "$(dirname "$MUNGE_KEY")"
    mungekey --create --keyfile="$MUNGE_KEY" --force
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
  fi
  pid_alive "$MUNGE_PID" && return
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  # munged refuses to run as root; run it as its own user as systemd would
  runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

write_config() {
  local cpus mem_mb tmp
  cpus=$(nproc)
  # leave 10% for the OS: a node claiming more memory than it has is drained by slurmctld
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARKER; rerun it instead of editing
ClusterName=local
# addresses given explicitly: a container's hostname may not resolve
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# jobs that do not ask for memory still share the node
DefMemPerCPU=1024
SchedulerType=sched/backfill
# look at the queue every few seconds: a one-node test cluster, requeued jobs restart quickly
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
KillWait=5
# finished jobs stay visible to squeue/scontrol this long (there is no sacct)
MinJobAge=600
JobRequeue=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$SPOOL_CTLD
SlurmdSpoolDir=$SPOOL_D
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    rm -f "$tmp"
    die "$CONF exists and was not written by this script; not touching it"
  fi
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1  # unchanged
  fi
  install -d "$CONF_DIR"
  install -m 0644 "$tmp" "$CONF"
  rm -f "$tmp"
  log "wrote $CONF (node $NODE, $cpus CPUs, ${mem_mb} MB)"
}

stop_daemons() {
  local pidfile pid
  for pidfile in "$SLURMD_PID" "$CTLD_PID" "$@"; do
    pid_alive "$pidfile" || continue
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$pidfile"
  done
}

wait_until_idle() {
  local state=""
  for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
      idle|mixed|allocated|completing) log "node $NODE is $state"; return 0 ;;
      drain*|down*|fail*|inval*) die "node $NODE is $state: $(sinfo -h -R -o %E 2>/dev/null)" ;;
    esac
    sleep 1
  done
  die "node $NODE not ready after 60 s (state '${state:-none}'); see $LOG_DIR/"
}

cmd_up() {
  [ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"
  install_packages
  start_munge
  install -d "$LOG_DIR" "$SPOOL_CTLD" "$SPOOL_D"
  if write_config; then
    stop_daemons  # a changed config needs fresh daemons
  fi
  local started=0
  if ! pid_alive "$CTLD_PID"; then
    slurmctld -f "$CONF"
    started=1
  fi
  if ! pid_alive "$SLURMD_PID"; then
    slurmd -f "$CONF" -N "$NODE"
    started=1
  fi
  wait_until_idle
  if [ $started -eq 1 ]; then
    # a fresh start: make sure a job really runs, not just that the daemons answer
    timeout 60 srun -N1 -n1 -t 1 hostname >/dev/null || die "srun hostname failed; see $LOG_DIR/"
  fi
  log "up: partition debug on $NODE"
}

cmd_down() {
  stop_daemons "$MUNGE_PID"
  log "down"
}

cmd_status() {
  local name pidfile
  for name in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
    pidfile=${name#*:}
    if pid_alive "$pidfile"; then echo "${name%%:*}: running (pid $(cat "$pidfile"))"
    else echo "${name%%:*}: stopped"; fi
  done
  sinfo 2>/dev/null || { echo "sinfo: controller not reachable"; return 1; }
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
