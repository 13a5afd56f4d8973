#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (Debian's slurm-wlm + munge) so the srun/sbatch launcher tests run
# instead of skipping. Everything Slurm writes lives under $1 (default /tmp/internvl-chat-slurm); /etc/slurm is left
# alone. Prints the SLURM_CONF to export. Exits non-zero, leaving nothing running, when a piece is missing.
set -euo pipefail
dir=${1:-/tmp/internvl-chat-slurm}
host=$(hostname -s)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  else
    echo "slurm-up: slurm-wlm/munge are not installed and cannot be installed here" >&2
    exit 1
  fi
fi
mkdir -p "$dir/state" "$dir/spool" /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
fi
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=internvlchat
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
sleep 0.5
nohup /usr/sbin/slurmctld -D -c >"$dir/slurmctld.stdout" 2>&1 &
nohup /usr/sbin/slurmd -D >"$dir/slurmd.stdout" 2>&1 &
for _ in $(seq 60); do
  if [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; then
    echo "$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "slurm-up: node did not become idle; see $dir/*.log" >&2
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
exit 1
