#!/usr/bin/env bash
# The concurrency and kill tests of tests/test_safety.py a second time, on a
# FUSE mount (bindfs) where renameat2(RENAME_EXCHANGE) fails with EINVAL, like
# on NFS, Lustre, GPFS and CephFS: the replace then takes its two-rename
# fallback under the per-image lock. test_runs_on_a_mount_without_exchange
# fails unless the tests' temporary directories really are on such a mount.
# Arguments (pytest options and test ids) replace tests/test_safety.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bindfs >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y bindfs
fi
root=$(mktemp -d)
mkdir "$root/disk" "$root/mount"
bindfs --no-allow-other "$root/disk" "$root/mount"
unmount() {
  fusermount -u "$root/mount" || fusermount -uz "$root/mount"
  rm -rf "$root"
}
trap unmount EXIT
echo "Safety tests on the bindfs mount $root/mount"
FRACTAL_TASKS_FUSE_MOUNT="$root/mount" .venv/bin/python -m pytest -q \
  -p no:cacheprovider --basetemp="$root/mount/pytest" "${@:-tests/test_safety.py}"
