#!/usr/bin/env bash
# Single-node Slurm cluster on localhost (Debian 12, root, no systemd) so that submitit job
# arrays can run in CI or by hand. Idempotent: exits 0 at once when the node is already up.
#   .ci/slurm-up.sh          install what is missing, configure, start the daemons
#   .ci/slurm-up.sh --down   stop them (state, database and logs stay in $SLURM_CI_DIR)
# Accounting (slurmdbd on a private MariaDB) is on because submitit polls `sacct` for job
# states: without it a task that dies before writing its result leaves result() waiting forever.
set -euo pipefail

DIR=${SLURM_CI_DIR:-/var/tmp/slurm-ci}    # spool, state, database, logs, pid files
CONF=/etc/slurm                           # the default, so no client needs SLURM_CONF
MARK="# written by .ci/slurm-up.sh"
NODE=$(hostname -s)                       # slurmd and slurmctld look themselves up by it
T0=$SECONDS

wait_for() { local end=$((SECONDS + $1)); shift; until "$@"; do ((SECONDS < end)) || return 1; sleep 0.2; done; }
# A pid file counts only while its process still bears the daemon's name (pids get reused).
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$(basename "$1" .pid)" ]]; }
gone() { local p; for p; do [[ ! -d /proc/$p ]] || return 1; done; }
stop() {  # all at once, as each takes ~2 s; and nothing but what the pid files name
  local f pids=()
  for f; do alive "$f" && pids+=("$(cat "$f")"); rm -f "$f"; done
  (( ${#pids[@]} )) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  wait_for 20 gone "${pids[@]}" || echo "slurm-up: still running after 20 s: ${pids[*]}" >&2
}
SLURM_PIDS=("$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/slurmdbd.pid")
db_up() { mariadb --no-defaults -S "$DIR/mariadbd.sock" -uroot -e '' 2>/dev/null; }
dbd_up() { timeout 5 sacctmgr -n list cluster >/dev/null 2>&1; }
node_up() { timeout 5 sinfo -h -n "$NODE" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc|comp)'; }
logs() { for f in "$DIR"/{mariadbd,slurmdbd,slurmctld,slurmd}.log; do echo "== $f" >&2; tail -n 20 "$f" >&2 || true; done; }

# sinfo takes ~10 s to give up on a dead slurmctld, so look at the pid files first.
if [[ ${1:-} != --down ]] && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_up && dbd_up; then
  echo "slurm: already up ($NODE)"; exit 0
fi
[[ $EUID == 0 ]] || { echo "slurm-up: run as root" >&2; exit 1; }
if [[ ${1:-} == --down ]]; then
  stop "${SLURM_PIDS[@]}"; stop "$DIR/mariadbd.pid" /run/munge/munged.pid; echo "slurm: stopped"; exit 0
fi
# Never clobber the configuration of a real cluster on a developer's machine.
if [[ -e $CONF/slurm.conf ]] && ! grep -qF "$MARK" "$CONF/slurm.conf"; then
  echo "slurm-up: $CONF/slurm.conf was not written by this script; refusing" >&2; exit 1
fi

missing=()  # what slurm-wlm pulls in, less its metapackage, plus the accounting database
for p in munge slurm-client slurmctld slurmd slurmdbd mariadb-server-core mariadb-client-core; do
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) == installed ]] || missing+=("$p")
done
if (( ${#missing[@]} )); then
  # Keep the maintainer scripts from starting daemons with the stock configuration.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Whatever half-state a previous run left, start clean; the database last, or slurmdbd complains.
stop "${SLURM_PIDS[@]}"; stop "$DIR/mariadbd.pid"
mkdir -p "$DIR/spool" "$DIR/state" "$CONF" /etc/munge /run/munge /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [[ -s /etc/munge/munge.key ]] || head -c 1024 /dev/urandom >/etc/munge/munge.key
  # munged refuses keys and directories that others could read or write.
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge; chmod 0755 /run/munge; chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --force
  munge -n | unmunge >/dev/null
fi

CPUS=$(nproc)
# Below what `free -m` says (procps may be absent), or slurmd drains the node for lack of memory.
MEM=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat >"$CONF/slurm.conf" <<EOF
$MARK; rewritten on every start
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
MailProg=/bin/true
# No cgroups or systemd in containers: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# Hand out single CPUs, so that the tasks of an array run side by side.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the node line over what slurmd detects (VMs and containers report odd topologies).
SlurmdParameters=config_overrides
ReturnToService=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$CONF/slurmdbd.conf" <<EOF
$MARK
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
EOF
chmod 600 "$CONF/slurmdbd.conf"   # slurmdbd insists

# A private MariaDB with no TCP port, reached through its own socket: its root is the system's
# root (unix_socket authentication), and a system MariaDB, if any, is never touched.
db=(--no-defaults --user=root --datadir="$DIR/db")
[[ -d $DIR/db/mysql ]] || mariadb-install-db "${db[@]}" --skip-test-db >"$DIR/mariadb-install.log" 2>&1 \
  || { tail "$DIR/mariadb-install.log" >&2; exit 1; }
setsid /usr/sbin/mariadbd "${db[@]}" --skip-networking --socket="$DIR/mariadbd.sock" \
  --pid-file="$DIR/mariadbd.pid" --log-error="$DIR/mariadbd.log" </dev/null >/dev/null 2>&1 &
export MYSQL_UNIX_PORT=$DIR/mariadbd.sock   # where libmariadb looks for StorageHost=localhost
if ! { wait_for 30 db_up && /usr/sbin/slurmdbd && wait_for 30 dbd_up \
       && /usr/sbin/slurmctld && /usr/sbin/slurmd && wait_for 60 node_up; }; then
  echo "slurm-up: MariaDB, slurmdbd or node $NODE failed or not up in time (30, 30, 60 s)" >&2
  timeout 10 sinfo -R >&2 || true; logs; exit 1
fi
sinfo
echo "slurm: up on $NODE ($CPUS CPUs, $MEM MB) in $((SECONDS - T0)) s; logs in $DIR"
