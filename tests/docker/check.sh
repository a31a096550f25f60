#!/usr/bin/env bash
# Builds the image from the Dockerfile and runs it the way users do, asserting on exit codes and outputs:
#   --help; pretrain on a read-only /data as a uid that is not 1000 (stopped at a step, as a preempted job); --resume in
#   a second container; reconstruct and embed; an unwritable /runs (one line naming --user); Docker's default 64 MB
#   /dev/shm with loader workers (workers cut, said once, no hang).
# Usage, from the project root (root, with podman or docker): bash tests/docker/check.sh [IMAGE_TAG]
#   ENGINE=docker uses Docker instead of podman; on machines without a registry for base images, first build a
#   stand-in for the FROM image (see the README's Docker section). Prints one line per case and a summary table.
set -euo pipefail
cd "$(dirname "$0")/../.."
ENGINE=${ENGINE:-podman}
TAG=${1:-ctmae-check}
WORK=$(mktemp -d /tmp/ctmae-docker-check.XXXXXX)
UID_=4321  # not 1000: the usual case on a shared server
TIMEOUT=${CASE_TIMEOUT:-900}
RESULTS=()
trap 'rm -rf "$WORK"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
record() { RESULTS+=("| $1 | $2 | $3 |"); echo "ok: $1 ($2 s) $3"; }
run() {  # run [engine run options...] -- [ctmae arguments...]: output in $WORK/out, exit code in $rc, seconds in $secs
    local opts=() ; while [ "$1" != "--" ]; do opts+=("$1"); shift; done; shift
    local t0; t0=$(now)
    set +e
    timeout -k 10 "$TIMEOUT" "$ENGINE" run --rm "${opts[@]}" "$TAG" "$@" >"$WORK/out" 2>&1
    rc=$?
    set -e
    secs=$(printf '%.1f' "$(echo "$(now) - $t0" | bc)")
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || { cat "$WORK/out"; fail "timed out (a hang) after $TIMEOUT s: $*"; }
}
expect() { grep -qF -- "$1" "$WORK/out" || { tail -40 "$WORK/out"; fail "expected '$1' in the output"; }; }

# Build
t0=$(now)
"$ENGINE" build -q -t "$TAG" . >/dev/null
build_s=$(printf '%.0f' "$(echo "$(now) - $t0" | bc)")
size=$("$ENGINE" image inspect "$TAG" --format '{{.Size}}')
record "build" "$build_s" "image $(echo "$size / 1000000" | bc) MB"

# Data: a NIfTI scan and a DICOM series of the sample data, mounted read-only; outputs owned by uid $UID_.
mkdir -p "$WORK/data" "$WORK/runs" "$WORK/root_runs"
cp sample_data/ct/lung1.nii.gz "$WORK/data/"
cp -r sample_data/dicom/lung1 "$WORK/data/lung1_dicom"
chmod -R a+rX "$WORK/data"
chown "$UID_:$UID_" "$WORK/runs"
DATA=(-v "$WORK/data:/data:ro")
AS_USER=(--user "$UID_:$UID_" -v "$WORK/runs:/runs")
TRAIN=(--model tiny --crop 64 --batch-size 2 --steps 6 --device cpu)

run -- --help
[ "$rc" -eq 0 ] || fail "--help exited $rc"; expect "pretrain"
record "--help" "$secs" "exit 0"

run "${AS_USER[@]}" "${DATA[@]}" --shm-size 1g -- pretrain /data --out /runs/exp1 "${TRAIN[@]}" --stop-at 3
[ "$rc" -eq 0 ] || { cat "$WORK/out"; fail "pretrain exited $rc"; }
expect "2 volume(s) ready"; expect "cpu budget:"
[ -f "$WORK/runs/exp1/checkpoints/last.pt" ] || fail "no checkpoint"
[ -n "$(ls "$WORK/runs/.cache/ctmae")" ] || fail "the cache is not under /runs/.cache"
[ "$(stat -c %u "$WORK/runs/exp1/checkpoints/last.pt")" = "$UID_" ] || fail "outputs not owned by uid $UID_"
record "pretrain as uid $UID_, read-only /data, --stop-at 3" "$secs" "exit 0, last.pt at step 3, cache in /runs/.cache"

run "${AS_USER[@]}" "${DATA[@]}" --shm-size 1g -- pretrain /data --out /runs/exp1 "${TRAIN[@]}" --resume
[ "$rc" -eq 0 ] || { cat "$WORK/out"; fail "resume exited $rc"; }
expect "resuming from step 3"
grep -q '"step": 6' "$WORK/runs/exp1/metrics.jsonl" || fail "the resumed run did not reach step 6"
record "--resume in a second container" "$secs" "resumed at step 3, finished step 6"

run "${AS_USER[@]}" "${DATA[@]}" -- reconstruct /runs/exp1/checkpoints/last.pt /data/lung1.nii.gz --out /runs/rec \
    --device cpu
[ "$rc" -eq 0 ] || { cat "$WORK/out"; fail "reconstruct exited $rc"; }
[ -f "$WORK/runs/rec/metrics.json" ] || fail "reconstruct wrote no metrics.json"
record "reconstruct" "$secs" "exit 0, metrics.json"

run "${AS_USER[@]}" "${DATA[@]}" -- embed /runs/exp1/checkpoints/last.pt /data --out /runs/emb.csv --device cpu
[ "$rc" -eq 0 ] || { cat "$WORK/out"; fail "embed exited $rc"; }
[ "$(wc -l <"$WORK/runs/emb.csv")" -eq 3 ] || fail "embed did not write 2 rows"
record "embed (NIfTI + DICOM series)" "$secs" "exit 0, 2 rows"

run --user "$UID_:$UID_" -v "$WORK/root_runs:/runs" "${DATA[@]}" -- pretrain /data --out /runs/exp2 "${TRAIN[@]}"
[ "$rc" -eq 2 ] || { cat "$WORK/out"; fail "an unwritable /runs exited $rc, expected 2"; }
[ "$(grep -c '^error:' "$WORK/out")" -eq 1 ] || fail "expected one error line"
expect "cannot write there (Permission denied)"; expect "--user \$(id -u):\$(id -g)"
record "unwritable /runs (root-owned folder)" "$secs" "exit 2: $(grep '^error:' "$WORK/out" | cut -c1-60)..."

run "${AS_USER[@]}" "${DATA[@]}" -- pretrain /data --out /runs/shm "${TRAIN[@]}" --crop 96 --workers 2 --steps 4
[ "$rc" -eq 0 ] || { cat "$WORK/out"; fail "pretrain with the default /dev/shm exited $rc"; }
[ "$(grep -c '/dev/shm has' "$WORK/out")" -eq 1 ] || fail "the shared-memory note should appear once"
grep -q "unable to allocate shared memory" "$WORK/out" && fail "a worker ran out of shared memory"
record "default 64 MB /dev/shm, --workers 2, 96³ crops" "$secs" "exit 0: $(grep -o 'loading in the training process\|[0-9] worker(s) instead' "$WORK/out" | head -1)"

echo
echo "| case | seconds | result |"
echo "|---|---|---|"
printf '%s\n' "${RESULTS[@]}"
echo "all docker checks passed ($ENGINE, $(date -u +%Y-%m-%d))"
