# shellcheck shell=bash
# The unprivileged SLURM user of the e2e test and the sudo rule that lets
# fractal-server (running as root) act as that user.
#
# Source this file, then:
#   slurm_user_setup USER         create USER (if missing) and the sudoers drop-in
#   slurm_user_reach USER PATH..  let USER reach each PATH: add o+x to those of
#                                 its parent directories that lack it (noted, and
#                                 undone by slurm_user_teardown)
#   slurm_user_teardown           remove the drop-in, undo the mode changes
# Needs: log, die (from the calling script), root.

SUDOERS_DROPIN=""
REACH_UNDO=()

slurm_user_setup() {
    local user="$1"
    if ! id "$user" >/dev/null 2>&1; then
        log "creating the unprivileged user $user"
        useradd --create-home --shell /bin/bash --comment "fractal e2e SLURM user" "$user"
    fi
    # fractal-server calls `sudo --set-home --non-interactive -u USER sbatch ...`
    # (and squeue, scancel, mkdir, cat); sudo resets the environment, so
    # SLURM_CONF (our cluster's config) must be kept explicitly.
    local f=/etc/sudoers.d/fractal-e2e-slurm
    local tmp
    tmp="$(mktemp)"
    cat >"$tmp" <<EOF
# written by .ci/slurm/users.sh for the fractal-server SLURM e2e test; removed at its end
Defaults>$user env_keep += "SLURM_CONF"
root ALL=($user) NOPASSWD: ALL
EOF
    visudo -c -q -f "$tmp" || { rm -f "$tmp"; die "sudoers drop-in rejected by visudo"; }
    install -m 440 "$tmp" "$f"
    rm -f "$tmp"
    SUDOERS_DROPIN="$f"
    # `sudo` must work without a password and keep SLURM_CONF
    local seen
    seen="$(SLURM_CONF=probe sudo --set-home --non-interactive -u "$user" sh -c 'echo "$(id -un) $SLURM_CONF"')" ||
        die "sudo -u $user does not work"
    [ "$seen" = "$user probe" ] || die "sudo -u $user: expected '$user probe', got '$seen'"
}

slurm_user_reach() {
    local user="$1" path d mode
    shift
    for path in "$@"; do
        # from / downwards: a directory is tested only once its parents are open
        d=""
        local part
        local IFS=/
        for part in $(dirname "$(readlink -f "$path")"); do
            [ -n "$part" ] || continue
            d="$d/$part"
            mode="$(stat -c '%a' "$d")"
            if ! runuser -u "$user" -- test -x "$d"; then
                log "temporarily adding o+x to $d (mode $mode) so that $user can reach $path"
                chmod o+x "$d"
                REACH_UNDO+=("$mode:$d")
            fi
        done
        unset IFS
        runuser -u "$user" -- test -r "$(readlink -f "$path")" || die "$user cannot read $path"
    done
}

slurm_user_teardown() {
    local item
    for item in "${REACH_UNDO[@]}"; do
        chmod "${item%%:*}" "${item#*:}"
    done
    REACH_UNDO=()
    [ -n "$SUDOERS_DROPIN" ] && rm -f "$SUDOERS_DROPIN"
    SUDOERS_DROPIN=""
}
