# shellcheck shell=bash
# A throwaway single-node SLURM cluster on 127.0.0.1 (munged, slurmctld,
# slurmd from Debian's packages), for the SLURM end-to-end test.
#
# Source this file, then:
#   slurm_install                 apt-get install what is missing (idempotent)
#   slurm_up DIR [PY]             write DIR/slurm.conf, start the daemons, wait
#                                 for the node to be idle; exports SLURM_CONF
#   slurm_down                    cancel every job, stop what slurm_up started
# Everything lives in DIR (config, state, spool, logs); /etc is not touched
# except for the munge key that the munge package creates on install.
# Needs: log, die, free_port (from the calling script), root.

SLURM_DIR=""
SLURM_PIDS=()
MUNGED_STARTED=0
MUNGE_SOCKET=""

slurm_install() {
    local missing=() p
    for p in munge slurmctld slurmd slurm-client sudo time; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "SLURM packages present: $(dpkg-query -W -f='${Package} ${Version}  ' munge slurmctld slurmd sudo)"
        return 0
    fi
    log "apt-get install ${missing[*]}"
    # no service may be started by the packages' maintainer scripts: this
    # script starts (and stops) its own daemons
    local policy=/usr/sbin/policy-rc.d added=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
    fi
    local rc=0
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${missing[@]}") >"${WORK:-/tmp}/apt-slurm.log" 2>&1 || rc=$?
    [ "$added" = 1 ] && rm -f "$policy"
    if [ "$rc" -ne 0 ]; then
        tail -n 30 "${WORK:-/tmp}/apt-slurm.log" >&2
        die "apt-get install ${missing[*]} failed"
    fi
}

_munge_works() {
    # $1: socket path
    munge -n -S "$1" 2>/dev/null | unmunge -S "$1" >/dev/null 2>&1
}

_start_munged() {
    local dir="$1"
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    # a munged of our own on its own socket: a system one (if any) is left alone
    install -d -o munge -g munge -m 755 "$dir/munge"
    MUNGE_SOCKET="$dir/munge/munge.socket"
    runuser -u munge -- /usr/sbin/munged --foreground --force \
        --socket="$MUNGE_SOCKET" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
        >"$dir/munge/stdout.log" 2>&1 </dev/null &
    SLURM_PIDS+=($!)
    MUNGED_STARTED=1
    local i
    for i in $(seq 1 50); do
        _munge_works "$MUNGE_SOCKET" && return 0
        sleep 0.2
    done
    cat "$dir/munge/munged.log" "$dir/munge/stdout.log" >&2 2>/dev/null
    die "munged did not start"
}

slurm_up() {
    local dir="$1" py="${2:-python3}"
    SLURM_DIR="$dir"
    mkdir -p "$dir"/{state,spool,log}
    chmod 755 "$dir" "$dir/log"
    _start_munged "$dir"

    local host cpus mem_total mem ctld_port slurmd_port
    host="$(hostname -s)"
    # the node's real description (CPUs, sockets, cores, threads, memory)
    local desc
    desc="$(slurmd -C | head -n 1)"
    log "slurmd -C: $desc"
    cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$desc")"
    mem_total="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$desc")"
    mem=$((mem_total * 9 / 10))
    SLURM_NODE_CPUS="$cpus"
    SLURM_NODE_MEM_MB="$mem"
    ctld_port="$(free_port "$py")"
    slurmd_port="$(free_port "$py")"

    # TaskProlog: every step records its view of the CPUs it was given
    cat >"$dir/task_prolog.sh" <<EOF
#!/bin/sh
# Runs as the job's user before each task of each step (slurm.conf TaskProlog).
# One printf, one write: concurrent steps append whole lines.
line="job=\$SLURM_JOB_ID step=\$SLURM_STEP_ID task=\$SLURM_PROCID cpus_per_task=\${SLURM_CPUS_PER_TASK:-unset}"
line="\$line start=\$(date +%s.%N) allowed=\$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)"
printf '%s\n' "\$line" >>"$dir/log/steps.log" 2>/dev/null
EOF
    cat >"$dir/task_epilog.sh" <<EOF
#!/bin/sh
printf 'job=%s step=%s task=%s end=%s\n' "\$SLURM_JOB_ID" "\$SLURM_STEP_ID" "\$SLURM_PROCID" \\
  "\$(date +%s.%N)" >>"$dir/log/steps.log" 2>/dev/null
EOF
    chmod 755 "$dir/task_prolog.sh" "$dir/task_epilog.sh"
    : >"$dir/log/steps.log"
    chmod 666 "$dir/log/steps.log"

    sed "/^#/d" <<EOF >"$dir/slurm.conf"
# single-node cluster for the fractal-server SLURM e2e test
ClusterName=fractale2e
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: plain process tracking, CPU binding by sched_setaffinity
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
TaskProlog=$dir/task_prolog.sh
TaskEpilog=$dir/task_epilog.sh
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# per-step CPU/memory sampling; no slurmdbd, so job records go to a text file
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 $(sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//' <<<"$desc") RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    chmod 644 "$dir/slurm.conf"
    export SLURM_CONF="$dir/slurm.conf"

    log "starting slurmctld (port $ctld_port) and slurmd (port $slurmd_port)"
    slurmctld -D -i -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 </dev/null &
    SLURM_PIDS+=($!)
    slurmd -D -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 </dev/null &
    SLURM_PIDS+=($!)
    local i state=""
    for i in $(seq 1 120); do
        state="$(sinfo -h -N -n "$host" -o '%t' 2>/dev/null || true)"
        case "$state" in idle) break ;; esac
        local p
        for p in "${SLURM_PIDS[@]}"; do
            kill -0 "$p" 2>/dev/null || {
                tail -n 20 "$dir"/log/slurm*.log "$dir"/log/*.out >&2 2>/dev/null
                die "a SLURM daemon exited during start-up"
            }
        done
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        tail -n 20 "$dir"/log/slurm*.log >&2 2>/dev/null
        die "node $host is '$state', not idle, after 60s"
    fi
    log "SLURM $(sinfo -V | awk '{print $2}') up: $(sinfo -h -N -o '%N %t cpus=%c mem=%mMB')"
}

slurm_down() {
    # may run from an EXIT trap: never stop half-way on an error
    local errexit=0
    case "$-" in *e*) errexit=1 ;; esac
    set +e
    [ -n "$SLURM_DIR" ] || { [ "$errexit" = 1 ] && set -e; return 0; }
    local p i
    if [ -n "${SLURM_CONF:-}" ] && [ -f "$SLURM_CONF" ]; then
        # nothing of ours may keep running: cancel every job, wait for it
        local ids
        ids="$(squeue -h -t all -o '%i' 2>/dev/null || true)"
        # shellcheck disable=SC2086
        [ -n "$ids" ] && { scancel --quiet $ids 2>/dev/null || true; }
        for i in $(seq 1 20); do
            [ -z "$(squeue -h -t running,pending,completing -o '%i' 2>/dev/null || true)" ] && break
            sleep 0.5
        done
    fi
    # daemons in reverse order: slurmd, slurmctld, munged
    for ((i = ${#SLURM_PIDS[@]} - 1; i >= 0; i--)); do
        p="${SLURM_PIDS[$i]}"
        kill -0 "$p" 2>/dev/null || continue
        kill -TERM "$p" 2>/dev/null
        local j
        for j in $(seq 1 40); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.25
        done
        kill -KILL "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    # munged was started via runuser: its pid file names the daemon itself
    if [ "$MUNGED_STARTED" = 1 ] && [ -s "$SLURM_DIR/munge/munged.pid" ]; then
        p="$(cat "$SLURM_DIR/munge/munged.pid")"
        kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null
    fi
    SLURM_PIDS=()
    SLURM_DIR=""
    [ "$errexit" = 1 ] && set -e
    return 0
}
