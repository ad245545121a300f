#!/usr/bin/env bash
# End-to-end test on SLURM: the same test as .ci/fractal_server_e2e.sh, with
# fractal-server's slurm_sudo runner on a single-node SLURM cluster that the
# script brings up on 127.0.0.1 (munged, slurmctld, slurmd from Debian's
# packages, installed if missing; .ci/slurm/cluster.sh) and stops at the end.
# fractal-server runs as root and submits the jobs as an unprivileged user
# (fractal-e2e-user, created if missing, owner of the project dir) through
# sudo (.ci/slurm/users.sh). Calculate and Apply are batched several tasks to
# a SLURM job; besides the checks of the local test it checks that every step
# got the CPUs its task asked for, that batched tasks ran at the same time
# on disjoint CPUs, and SLURM's job-completion records (.ci/slurm/checks.py).
#
# Usage: bash .ci/fractal_server_slurm_e2e.sh [--smoke]
# Environment: as .ci/fractal_server_e2e.sh (FRACTAL_E2E_STRICT_LOGS=1 makes a
# "warning" in a task log of the clean run fatal).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/fractal_server_e2e.sh" --slurm "$@"
