#!/usr/bin/env bash
# Job entrypoint for fanout-research trainer images.
#
# 1. Get the candidate's code: FANOUT_CODE_DIR (already mounted), or a fresh checkout of the
#    exact commit FANOUT_GIT_COMMIT from FANOUT_GIT_URL.
# 2. Verify the data directory FANOUT_DATA_DIR against its manifest (prepare.py --verify).
# 3. Run FANOUT_COMMAND (default: python train.py) and exit with its exit code.
# 4. Copy the job's `fanout-result {json}` line to the Kubernetes termination log
#    (/dev/termination-log, or FANOUT_TERMINATION_LOG) when it exists and is writable, and
#    to FANOUT_RESULT_FILE when set, so the orchestrator can read it without the logs.
#
# Exit codes: the trainer's own; 64 bad setup (no code, unknown commit); 65 data check failed.
set -uo pipefail

log() { printf 'entrypoint: %s\n' "$*" >&2; }
die() { log "error: $2"; exit "$1"; }

: "${FANOUT_DATA_DIR:?entrypoint: error: set FANOUT_DATA_DIR to the prepared data directory}"
command_line="${FANOUT_COMMAND:-python train.py}"
termination_log="${FANOUT_TERMINATION_LOG:-/dev/termination-log}"

if [[ -n "${FANOUT_CODE_DIR:-}" ]]; then
  [[ -d "$FANOUT_CODE_DIR" ]] || die 64 "FANOUT_CODE_DIR=$FANOUT_CODE_DIR is not a directory"
  code_dir="$FANOUT_CODE_DIR"
elif [[ -n "${FANOUT_GIT_URL:-}" ]]; then
  [[ -n "${FANOUT_GIT_COMMIT:-}" ]] || die 64 "FANOUT_GIT_URL is set but FANOUT_GIT_COMMIT is not; give the exact commit to run"
  code_dir="${FANOUT_WORK_DIR:-/tmp/fanout-code}"
  rm -rf "$code_dir" && mkdir -p "$code_dir" || die 64 "cannot create $code_dir"
  git -C "$code_dir" init -q && git -C "$code_dir" remote add origin "$FANOUT_GIT_URL"
  # A shallow fetch of the one commit is enough when the server allows it; else fetch all.
  if ! git -C "$code_dir" fetch -q --depth 1 origin "$FANOUT_GIT_COMMIT" 2>/dev/null; then
    git -C "$code_dir" fetch -q origin '+refs/heads/*:refs/remotes/origin/*' \
      || die 64 "cannot fetch from $FANOUT_GIT_URL"
  fi
  git -C "$code_dir" -c advice.detachedHead=false checkout -q "$FANOUT_GIT_COMMIT" \
    || die 64 "commit $FANOUT_GIT_COMMIT is not in $FANOUT_GIT_URL; push it first"
  head=$(git -C "$code_dir" rev-parse HEAD)
  [[ "$head" == "$FANOUT_GIT_COMMIT"* ]] || die 64 "checked out $head, expected $FANOUT_GIT_COMMIT"
  log "running commit $head from $FANOUT_GIT_URL"
else
  die 64 "no code: set FANOUT_CODE_DIR, or FANOUT_GIT_URL and FANOUT_GIT_COMMIT"
fi
cd "$code_dir" || die 64 "cannot enter $code_dir"

# The full check here; the trainer then only compares sizes instead of hashing twice.
if [[ -f prepare.py && "${FANOUT_VERIFY_DATA:-1}" != 0 ]]; then
  python prepare.py --verify "$FANOUT_DATA_DIR" --level "${FANOUT_VERIFY_LEVEL:-auto}" >&2 \
    || die 65 "data directory $FANOUT_DATA_DIR failed its manifest check (see above)"
  export FANOUT_VERIFY="${FANOUT_VERIFY:-sizes}"
fi

export PYTHONUNBUFFERED=1
output=$(mktemp)
trap 'rm -f "$output"' EXIT
# stdout goes to the job log and to a file we search for the result line; stderr untouched.
bash -c "$command_line" | tee "$output"
status=${PIPESTATUS[0]}

result=$(grep '^fanout-result ' "$output" | tail -n 1 || true)
if [[ -n "$result" ]]; then
  if [[ -n "${FANOUT_RESULT_FILE:-}" ]]; then printf '%s\n' "$result" > "$FANOUT_RESULT_FILE"; fi
  if [[ -w "$termination_log" ]]; then printf '%s\n' "$result" > "$termination_log"; fi
elif (( status != 0 )) && [[ -w "$termination_log" ]]; then
  printf 'fanout-error exit %s\n' "$status" > "$termination_log"
fi
log "trainer exited with $status"
exit "$status"
