#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the slow test of hydra/launcher=slurm
# (tests/test_slurm.py) and for trying sweeps by hand. Needs root and Debian's packages:
#   apt-get install -y slurm-wlm munge slurmdbd mariadb-server
# (slurmdbd + MariaDB give the accounting that `sacct`, and so submitit, reads job states from).
#
#   scripts/slurm_local.sh start    # idempotent: starts what is not running, waits for the node
#   scripts/slurm_local.sh status
#   scripts/slurm_local.sh stop     # stops the daemons it started (by their pid files)
#   export SLURM_CONF=$(scripts/slurm_local.sh conf)   # then sbatch, squeue, sacct, scancel
#
# Everything lives under $GBLM_SLURM_DIR (default /tmp/gblm-slurm): slurm.conf, state, logs. The
# node is this host as `slurmd -C` describes it. No cgroups: ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none, JobAcctGatherType=jobacct_gather/linux, so it runs in a container too.
set -euo pipefail

DIR=${GBLM_SLURM_DIR:-/tmp/gblm-slurm}
HOST=$(hostname -s)
CONF=$DIR/slurm.conf
CTLD_PORT=${GBLM_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${GBLM_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${GBLM_SLURM_DBD_PORT:-6819}
export SLURM_CONF=$CONF

log() { echo "slurm_local: $*" >&2; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
with_dbd() { command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; }

write_conf() {
  mkdir -p "$DIR"/{state,spool,log,run}
  local node accounting=""
  node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=...
  if with_dbd; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
AccountingStoragePort=$DBD_PORT"
  fi
  cat >"$CONF" <<CONF
ClusterName=gblm-local
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
MinJobAge=600
$accounting
$node State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  [[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged
  log "munged started"
}

start_dbd() {
  with_dbd || { log "no slurmdbd/mariadb: no accounting (sacct, and so submitit, will not work)"; return; }
  if ! mariadb-admin ping >/dev/null 2>&1; then
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    (setsid mariadbd-safe >"$DIR/log/mariadb.out" 2>&1 &)
    for _ in $(seq 60); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 1; done
    log "mariadb started"
  fi
  alive "$DIR/run/slurmdbd.pid" && return
  cat >"$DIR/slurmdbd.conf" <<CONF
DbdHost=$HOST
DbdPort=$DBD_PORT
SlurmUser=root
AuthType=auth/munge
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=gblm_slurm_acct
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
CONF
  chmod 600 "$DIR/slurmdbd.conf"
  slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
  sacctmgr -i -Q add cluster gblm-local >/dev/null 2>&1 || true
  log "slurmdbd started"
}

start() {
  write_conf
  start_munge
  start_dbd
  alive "$DIR/run/slurmctld.pid" || { slurmctld -f "$CONF"; log "slurmctld started"; }
  alive "$DIR/run/slurmd.pid" || { slurmd -f "$CONF"; log "slurmd started"; }
  for _ in $(seq 120); do
    if sinfo -h -n "$HOST" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
      log "node $HOST is up (SLURM_CONF=$CONF)"
      return
    fi
    if sinfo -h -n "$HOST" -o %t 2>/dev/null | grep -Eq '^(down|drain)'; then
      scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true  # e.g. after a reboot
    fi
    sleep 1
  done
  log "the node did not come up; see $DIR/log/"; sinfo -N -l >&2 || true; exit 1
}

stop() {
  local name
  for name in slurmd slurmctld slurmdbd; do
    if alive "$DIR/run/$name.pid"; then kill "$(cat "$DIR/run/$name.pid")"; log "$name stopped"; fi
  done
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) sinfo -N -l; squeue ;;
  conf) echo "$CONF" ;;
  *) echo "usage: $0 start|stop|status|conf" >&2; exit 2 ;;
esac
