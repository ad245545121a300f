#!/usr/bin/env bash
# End-to-end test: collect fractal_tasks into a real fractal-server (local
# runner, PostgreSQL) and run the registration workflow on a synthetic plate.
#
# Usage: bash .ci/fractal_server_e2e.sh [--smoke] [--slurm] [--run=SCRIPT]
#   --smoke   test only the server machinery: collect a throwaway wheel made on
#             the fly and run one no-op job (does not need fractal_tasks).
#   --slurm   use fractal-server's slurm_sudo runner on a single-node SLURM
#             cluster started here (see .ci/fractal_server_slurm_e2e.sh).
#   --run=SCRIPT  bring everything up as for the test (wheel built, manifest
#             validated), then run the Python SCRIPT with the package python
#             instead of the test; it finds the server in FRACTAL_E2E_URL,
#             FRACTAL_E2E_EMAIL, FRACTAL_E2E_PASSWORD, FRACTAL_E2E_WHEEL,
#             FRACTAL_E2E_WORK, FRACTAL_E2E_PROJECT_DIR, FRACTAL_E2E_BACKEND,
#             FRACTAL_E2E_SLURM_USER, FRACTAL_E2E_SLURM_DIR and
#             FRACTAL_E2E_SERVER_VERSION (used by benchmarks/bench_fractal_server.py).
#
# Environment (all optional):
#   FRACTAL_E2E_PKG_PYTHON   python with fractal_tasks + ngio installed
#                            (default: <repo>/.venv/bin/python)
#   FRACTAL_E2E_SERVER_SPEC  pip requirement for the server (default: fractal-server)
#   FRACTAL_E2E_SERVER_VENV  reuse an existing server venv instead of making one
#   FRACTAL_E2E_KEEP=1       keep the work dir (it is kept on failure anyway)
#   FRACTAL_E2E_TIMEOUT      seconds to wait for a collection or a job (default 1200)
#   FRACTAL_E2E_STRICT_LOGS=1   fail if a task log of the clean run contains
#                            "warning" (any case); otherwise such lines are only listed
#   FRACTAL_E2E_SLURM_USER   the unprivileged SLURM user (--slurm; default fractal-e2e-user)
#   FRACTAL_E2E_MEM_CHECK=0  --slurm: do not run the tasks under GNU time to check that
#                            no task process exceeds the mem it declares (on by default)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PKG_PY="${FRACTAL_E2E_PKG_PYTHON:-$REPO/.venv/bin/python}"
SERVER_SPEC="${FRACTAL_E2E_SERVER_SPEC:-fractal-server}"
KEEP="${FRACTAL_E2E_KEEP:-0}"
TIMEOUT="${FRACTAL_E2E_TIMEOUT:-1200}"
STRICT_LOGS="${FRACTAL_E2E_STRICT_LOGS:-0}"
MEM_CHECK="${FRACTAL_E2E_MEM_CHECK:-1}"
MODE=full
BACKEND=local
RUN_SCRIPT=""
SLURM_USER="${FRACTAL_E2E_SLURM_USER:-fractal-e2e-user}"
for arg in "$@"; do
    case "$arg" in
        --smoke) MODE=smoke ;;
        --slurm) BACKEND=slurm ;;
        --run=*) RUN_SCRIPT="$(readlink -f "${arg#--run=}")" ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

T0=$(date +%s)
log() { echo "[e2e +$(($(date +%s) - T0))s] $*"; }
die() { echo "[e2e] FAIL: $*" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fractal-e2e.XXXXXX")"
chmod 711 "$WORK"   # the postgres user must be able to reach $WORK/pg
SERVER_PID=""
PG_STARTED=0
PG_PID=""
PG_OS_USER=postgres
PGBIN=""
PGDATA="$WORK/pg/data"

as_pg() {
    if command -v runuser >/dev/null 2>&1; then
        runuser -u "$PG_OS_USER" -- "$@"
    else
        su -s /bin/sh "$PG_OS_USER" -c "$(printf '%q ' "$@")"
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        log "stopping fractal-server (pid $SERVER_PID)"
        # the server runs in its own session/process group: stop the group
        kill -TERM -- "-$SERVER_PID" 2>/dev/null
        for _ in $(seq 1 40); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    if [ "$BACKEND" = slurm ] && declare -F slurm_down >/dev/null; then
        [ -n "${SLURM_DIR:-}" ] && log "stopping SLURM (jobs, slurmd, slurmctld, munged)"
        slurm_down
        slurm_user_teardown
    fi
    if [ "$PG_STARTED" = 1 ]; then
        log "stopping PostgreSQL"
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            kill -TERM "$PG_PID" 2>/dev/null
        wait "$PG_PID" 2>/dev/null
    fi
    if [ "$rc" -ne 0 ]; then
        if [ -f "$WORK/server/server.log" ]; then
            echo "----- last lines of the fractal-server log -----" >&2
            tail -n 40 "$WORK/server/server.log" >&2
            echo "------------------------------------------------" >&2
        fi
        echo "[e2e] FAILED after $(($(date +%s) - T0))s; work dir kept: $WORK" >&2
    elif [ "$KEEP" = 1 ]; then
        log "work dir kept: $WORK"
    else
        log "removing the work dir"
        rm -rf "$WORK"
        log "done"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    "$1" - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

# --------------------------------------------------------------------------
# 1. A Python >= 3.13 for the server (newest found under pyenv or on PATH)
# --------------------------------------------------------------------------
find_server_python() {
    local cands=() c
    for c in "$HOME"/.pyenv/versions/*/bin/python3 /usr/local/bin/python3* /usr/bin/python3*; do
        [ -x "$c" ] && cands+=("$c")
    done
    for c in python3.15 python3.14 python3.13 python3 python; do
        command -v "$c" >/dev/null 2>&1 && cands+=("$(command -v "$c")")
    done
    for c in "${cands[@]}"; do
        case "$c" in *-config) continue ;; esac
        "$c" -c 'import sys, venv
if sys.version_info >= (3, 13):
    print("%d.%d.%d %s" % (sys.version_info[:3] + (sys.executable,)))' 2>/dev/null || true
    done | sort -V -k1,1 | tail -n 1
}

found="$(find_server_python)"
[ -n "$found" ] || die "no Python >= 3.13 found (looked in ~/.pyenv/versions and PATH)"
SERVER_BASE_PY="${found#* }"
PY_VERSION="${found%% *}"
PY_MINOR="${PY_VERSION%.*}"
log "server Python: $SERVER_BASE_PY ($PY_VERSION)"

if [ "$BACKEND" = slurm ]; then
    # shellcheck source=slurm/cluster.sh
    source "$HERE/slurm/cluster.sh"
    # shellcheck source=slurm/users.sh
    source "$HERE/slurm/users.sh"
    slurm_install
    slurm_user_setup "$SLURM_USER"
    # the SLURM jobs run the server venv's and the task venv's python as
    # $SLURM_USER: both lead back to this interpreter
    slurm_user_reach "$SLURM_USER" "$SERVER_BASE_PY"
    slurm_up "$WORK/slurm" "$SERVER_BASE_PY"
fi

# --------------------------------------------------------------------------
# 2. Server venv (in the background while PostgreSQL starts)
# --------------------------------------------------------------------------
mkdir -p "$WORK/server" "$WORK/tasks" "$WORK/jobs" "$WORK/project" "$WORK/wheels"
# the SLURM user owns the project dir (zarrs, fractal-server's per-user job dirs)
[ "$BACKEND" = slurm ] && chown "$SLURM_USER:" "$WORK/project"
if [ -n "${FRACTAL_E2E_SERVER_VENV:-}" ]; then
    SVENV="$FRACTAL_E2E_SERVER_VENV"
    log "reusing server venv $SVENV"
    : > "$WORK/server/pip.log"
    PIP_PID=""
else
    SVENV="$WORK/server/venv"
    log "installing $SERVER_SPEC into $SVENV (background)"
    (
        "$SERVER_BASE_PY" -m venv "$SVENV" &&
            "$SVENV/bin/python" -m pip install -q --upgrade pip &&
            "$SVENV/bin/python" -m pip install -q "$SERVER_SPEC"
    ) >"$WORK/server/pip.log" 2>&1 &
    PIP_PID=$!
fi

# --------------------------------------------------------------------------
# 3. PostgreSQL: fresh cluster in $WORK/pg on a free port, run as `postgres`
# --------------------------------------------------------------------------
find_pgbin() {
    local p
    if p="$(command -v pg_ctl 2>/dev/null)" && [ -x "$(dirname "$(readlink -f "$p")")/initdb" ]; then
        dirname "$(readlink -f "$p")"
        return
    fi
    # shellcheck disable=SC2012
    p="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$p" ] && [ -x "$p/initdb" ] && echo "$p"
}
PGBIN="$(find_pgbin || true)"
if [ -z "$PGBIN" ]; then
    log "PostgreSQL not found: apt-get install postgresql"
    # keep the package's maintainer scripts from starting a system cluster
    POLICY=/usr/sbin/policy-rc.d
    ADDED_POLICY=0
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY" && ADDED_POLICY=1
    fi
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql) \
        >"$WORK/apt.log" 2>&1 || { tail -n 30 "$WORK/apt.log" >&2; die "apt-get install postgresql failed"; }
    [ "$ADDED_POLICY" = 1 ] && rm -f "$POLICY"
    PGBIN="$(find_pgbin || true)"
    [ -n "$PGBIN" ] || die "PostgreSQL binaries not found after installing"
fi
if ! id "$PG_OS_USER" >/dev/null 2>&1; then
    PG_OS_USER=fractal-e2e-pg
    id "$PG_OS_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_OS_USER"
fi
PG_PORT="$(free_port "$SERVER_BASE_PY")"
PG_PASSWORD="$("$SERVER_BASE_PY" -c 'import secrets; print(secrets.token_hex(16))')"
mkdir -p "$WORK/pg"
chown "$PG_OS_USER" "$WORK/pg"
as_pg test -w "$WORK/pg" || die "user $PG_OS_USER cannot reach $WORK/pg (set TMPDIR to a world-traversable dir)"
log "PostgreSQL $("$PGBIN/postgres" --version | grep -oE '[0-9]+(\.[0-9]+)+' | head -n 1) on 127.0.0.1:$PG_PORT (as $PG_OS_USER)"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -E UTF8 --locale=C \
    --auth-local=trust --auth-host=scram-sha-256 >"$WORK/pg/initdb.log" 2>&1 ||
    { cat "$WORK/pg/initdb.log" >&2; die "initdb failed"; }
# run the postmaster as our own child (not daemonized by pg_ctl), so that it is
# reaped by this script and never outlives it
as_pg "$PGBIN/postgres" -D "$PGDATA" -c listen_addresses=127.0.0.1 -p "$PG_PORT" \
    -k "$WORK/pg" -c fsync=off -c full_page_writes=off >"$WORK/pg/postgres.log" 2>&1 </dev/null &
PG_PID=$!
PG_STARTED=1
for i in $(seq 1 120); do
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
    kill -0 "$PG_PID" 2>/dev/null || { cat "$WORK/pg/postgres.log" >&2; die "PostgreSQL exited during start-up"; }
    [ "$i" = 120 ] && { cat "$WORK/pg/postgres.log" >&2; die "PostgreSQL did not start within 60s"; }
    sleep 0.5
done
as_pg "$PGBIN/psql" -h "$WORK/pg" -p "$PG_PORT" -U postgres -d postgres -q -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE fractal LOGIN PASSWORD '$PG_PASSWORD';" \
    -c "CREATE DATABASE fractal OWNER fractal;" >/dev/null || die "could not create the fractal DB"

# --------------------------------------------------------------------------
# 4. Wheel under test (built meanwhile), then wait for the server venv
# --------------------------------------------------------------------------
if [ "$MODE" = full ]; then
    [ -x "$PKG_PY" ] || die "package python not found: $PKG_PY"
    log "building the fractal_tasks wheel"
    "$PKG_PY" -m pip wheel -q --no-deps --no-build-isolation "$REPO" -w "$WORK/wheels" >"$WORK/wheel.log" 2>&1 ||
        "$PKG_PY" -m pip wheel -q --no-deps "$REPO" -w "$WORK/wheels" >>"$WORK/wheel.log" 2>&1 ||
        { cat "$WORK/wheel.log" >&2; die "building the wheel failed"; }
    WHEEL="$(ls "$WORK"/wheels/*.whl | head -n 1)"
    log "wheel: $(basename "$WHEEL")"
fi

if [ -n "$PIP_PID" ]; then
    if ! wait "$PIP_PID"; then
        grep -v "is ignored: it is neither a file nor a directory" "$WORK/server/pip.log" | tail -n 30 >&2
        die "pip install $SERVER_SPEC failed"
    fi
fi
FS_VERSION="$("$SVENV/bin/python" -c 'import fractal_server; print(fractal_server.__VERSION__)')"
log "fractal-server $FS_VERSION installed"

# --------------------------------------------------------------------------
# 5. Manifest check with fractal-server's own pydantic model (before the server
#    is even started: an invalid manifest fails fast)
# --------------------------------------------------------------------------
DRIVER=("$SVENV/bin/python" "$HERE/fractal_server_e2e.py")
if [ "$MODE" = full ]; then
    log "validating the manifest with fractal_server.app.schemas.v2.ManifestV2"
    "${DRIVER[@]}" validate-manifest --repo-manifest "$REPO/fractal_tasks/__FRACTAL_MANIFEST__.json" \
        --wheel "$WHEEL" || die "manifest validation failed"
else
    WHEEL="$("${DRIVER[@]}" make-dummy-wheel --out "$WORK/wheels")"
    log "throwaway wheel: $(basename "$WHEEL")"
fi

# --------------------------------------------------------------------------
# 6. Configure fractal-server, migrate the DB, create admin + resource/profile
# --------------------------------------------------------------------------
JWT_SECRET="$("$SVENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))')"
ADMIN_EMAIL="admin@example.org"
ADMIN_PASSWORD="$("$SVENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(12))')"
RUNNER_BACKEND=local
RESOURCE_IN="$HERE/e2e/resource.json.in"
PROFILE_JSON="$HERE/e2e/profile.json"
if [ "$BACKEND" = slurm ]; then
    RUNNER_BACKEND=slurm_sudo
    RESOURCE_IN="$HERE/slurm/resource.json.in"
    PROFILE_JSON="$WORK/server/profile.json"
    sed -e "s|@SLURM_USER@|$SLURM_USER|" "$HERE/slurm/profile.json.in" >"$PROFILE_JSON"
fi
sed -e "s|@JWT_SECRET_KEY@|$JWT_SECRET|" -e "s|@PG_PORT@|$PG_PORT|" -e "s|@PG_USER@|fractal|" \
    -e "s|@PG_PASSWORD@|$PG_PASSWORD|" -e "s|@PG_DB@|fractal|" \
    -e "s|^FRACTAL_RUNNER_BACKEND=.*|FRACTAL_RUNNER_BACKEND=$RUNNER_BACKEND|" \
    "$HERE/e2e/fractal_server.env.in" >"$WORK/server/.fractal_server.env"
sed -e "s|@TASKS_DIR@|$WORK/tasks|" -e "s|@JOBS_DIR@|$WORK/jobs|" \
    -e "s|@PY_MINOR@|$PY_MINOR|g" -e "s|@PY_EXE@|$SERVER_BASE_PY|" \
    -e "s|@WORKER_PY@|$SVENV/bin/python|" -e "s|@NODE_CPUS@|${SLURM_NODE_CPUS:-1}|g" \
    -e "s|@NODE_MEM_MB@|${SLURM_NODE_MEM_MB:-1000}|g" \
    "$RESOURCE_IN" >"$WORK/server/resource.json"

cd "$WORK/server"   # fractal-server reads ./.fractal_server.env
log "fractalctl set-db"
"$SVENV/bin/fractalctl" set-db >"$WORK/server/set-db.log" 2>&1 ||
    { tail -n 40 "$WORK/server/set-db.log" >&2; die "fractalctl set-db failed"; }
log "fractalctl init-db-data (admin user, $RUNNER_BACKEND resource and profile)"
"$SVENV/bin/fractalctl" init-db-data --resource "$WORK/server/resource.json" \
    --profile "$PROFILE_JSON" --admin-email "$ADMIN_EMAIL" \
    --admin-pwd "$ADMIN_PASSWORD" --admin-project-dir "$WORK/project" \
    >"$WORK/server/init-db-data.log" 2>&1 ||
    { tail -n 40 "$WORK/server/init-db-data.log" >&2; die "fractalctl init-db-data failed"; }

# --------------------------------------------------------------------------
# 7. Start the server in its own process group and wait for it
# --------------------------------------------------------------------------
PORT="$(free_port "$SVENV/bin/python")"
URL="http://127.0.0.1:$PORT"
setsid "$SVENV/bin/fractalctl" start --host 127.0.0.1 --port "$PORT" \
    >"$WORK/server/server.log" 2>&1 </dev/null &
SERVER_PID=$!
log "fractal-server starting at $URL (pid $SERVER_PID)"
for i in $(seq 1 120); do
    if "$SVENV/bin/python" -c "import urllib.request, sys; urllib.request.urlopen('$URL/api/alive/', timeout=2)" 2>/dev/null; then
        break
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || die "fractal-server exited during start-up"
    [ "$i" = 120 ] && die "fractal-server did not answer within 60s"
    sleep 0.5
done
log "fractal-server is up"

# --------------------------------------------------------------------------
# 8. The test itself (collection, dataset, workflow, jobs, checks)
# --------------------------------------------------------------------------
COMMON=(--url "$URL" --email "$ADMIN_EMAIL" --password "$ADMIN_PASSWORD"
    --wheel "$WHEEL" --work "$WORK" --project-dir "$WORK/project" --timeout "$TIMEOUT")
if [ "$BACKEND" = slurm ]; then
    COMMON+=(--backend slurm --slurm-user "$SLURM_USER" --slurm-dir "$WORK/slurm")
fi
[ "$STRICT_LOGS" = 1 ] && COMMON+=(--strict-logs)
if [ -n "$RUN_SCRIPT" ]; then
    [ "$MODE" = full ] || die "--run needs the package wheel (not --smoke)"
    log "running $RUN_SCRIPT instead of the test"
    FRACTAL_E2E_URL="$URL" FRACTAL_E2E_EMAIL="$ADMIN_EMAIL" \
        FRACTAL_E2E_PASSWORD="$ADMIN_PASSWORD" FRACTAL_E2E_WHEEL="$WHEEL" \
        FRACTAL_E2E_WORK="$WORK" FRACTAL_E2E_PROJECT_DIR="$WORK/project" \
        FRACTAL_E2E_BACKEND="$BACKEND" FRACTAL_E2E_SLURM_USER="$SLURM_USER" \
        FRACTAL_E2E_SLURM_DIR="$WORK/slurm" FRACTAL_E2E_SERVER_VERSION="$FS_VERSION" \
        "$PKG_PY" "$RUN_SCRIPT"
elif [ "$MODE" = full ]; then
    RUN_OPTS=()
    [ "$MEM_CHECK" = 0 ] && RUN_OPTS+=(--no-mem-check)
    "${DRIVER[@]}" run "${COMMON[@]}" --pkg-python "$PKG_PY" --checks-dir "$HERE/e2e" \
        --server-version "$FS_VERSION" "${RUN_OPTS[@]}"
else
    "${DRIVER[@]}" smoke "${COMMON[@]}" --server-version "$FS_VERSION"
fi
log "total time $(($(date +%s) - T0))s"
