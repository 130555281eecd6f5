# Helpers for the .ci/ scripts (sourced, not run).

# copy_source_tree DEST: the tracked and untracked-but-not-ignored files of the work tree, so that
# a build there sees the sources as a clean clone would and leaves nothing in the work tree.
copy_source_tree() {
  mkdir -p "$1"
  git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$1" -xf -
}

# step NAME: prints a timestamped headline; `took` prints the seconds since the last step.
step() { STEP_START=$SECONDS; echo "== $(date +%H:%M:%S) $*"; }
took() { echo "   ($((SECONDS - STEP_START)) s)"; }

# show_log_on_failure LOG COMMAND...: runs COMMAND with its output in LOG, prints LOG's tail if it fails.
show_log_on_failure() {
  local log=$1; shift
  if ! "$@" > "$log" 2>&1; then
    echo "FAILED: $*" >&2
    tail -n 60 "$log" >&2
    return 1
  fi
}
