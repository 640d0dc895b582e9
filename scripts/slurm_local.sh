#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for testing run_with_submitit.py (needs root).
#   scripts/slurm_local.sh start [STATE_DIR]   # install if missing, configure, start; prints the env to source
#   scripts/slurm_local.sh stop  [STATE_DIR]   # stop the daemons started by `start` (by PID)
# STATE_DIR (default $SLURM_LOCAL_DIR or /tmp/dap-detr-slurm) holds slurm.conf, state, logs,
# PIDs and env.sh; clients need `source STATE_DIR/env.sh` (SLURM_CONF, and PATH with a sacct
# stand-in: without accounting, sacct fails and submitit would read every job state as UNKNOWN).
set -euo pipefail
cmd="${1:-}"
dir="${2:-${SLURM_LOCAL_DIR:-/tmp/dap-detr-slurm}}"

stop() {
  for name in slurmd slurmctld munged; do
    pidfile="$dir/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  echo "[slurm_local] installing slurmctld slurmd slurm-client munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq slurmctld slurmd slurm-client munge >&2 \
    || { apt-get update -qq >&2 && apt-get install -y -qq slurmctld slurmd slurm-client munge >&2; }
}

start() {
  [ "$(id -u)" = 0 ] || { echo "[slurm_local] needs root" >&2; exit 1; }
  install
  stop
  rm -rf "$dir/state" "$dir/spool" "$dir"/*.log "$dir"/*.out
  mkdir -p "$dir/state" "$dir/spool" "$dir/bin"

  # munge: a key readable by the munge user only, and its socket folder.
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    head -c 1024 /dev/urandom > /etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  if ! munge -n >/dev/null 2>&1; then
    setpriv --reuid=munge --regid=munge --init-groups munged -F >"$dir/munged.log" 2>&1 &
    echo $! > "$dir/munged.pid"
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  fi

  host=$(hostname -s)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after the credential expires (default 120 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued.
KillWait=2
# A requeued job waits for its BeginTime (cred_expire) and then for a scheduler pass: pass
# every second, not every 30-60 s.
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=600
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.daemon.pid
SlurmdPidFile=$dir/slurmd.daemon.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

  cat > "$dir/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in for a cluster without accounting: "JobID|State|NodeList" of each -j job, from scontrol.
echo "JobID|State|NodeList"
while [ $# -gt 0 ]; do
  if [ "$1" = -j ]; then
    scontrol -o show job "$2" 2>/dev/null | sed -E 's/^JobId=([0-9]+) .* JobState=([A-Z_]+) .* NodeList=([^ ]*).*/\1|\2|\3/'
    shift
  fi
  shift
done
EOF
  chmod +x "$dir/bin/sacct"
  printf 'export SLURM_CONF=%q\nexport PATH=%q:"$PATH"\n' "$dir/slurm.conf" "$dir/bin" > "$dir/env.sh"

  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -D -i >"$dir/slurmctld.out" 2>&1 &
  echo $! > "$dir/slurmctld.pid"
  slurmd -D >"$dir/slurmd.out" 2>&1 &
  echo $! > "$dir/slurmd.pid"
  for _ in $(seq 100); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && { cat "$dir/env.sh"; return; }
    sleep 0.2
  done
  echo "[slurm_local] the node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  stop
  exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [STATE_DIR]" >&2; exit 2 ;;
esac
