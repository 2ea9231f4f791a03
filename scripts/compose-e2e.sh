#!/usr/bin/env bash
# The stack in real containers, end to end: bash scripts/compose-e2e.sh
#
# Needs a Docker engine with Compose v2 (bash ../shared/tools/container-engine.sh sets one up
# without Docker Hub). Builds FROM $BASE_IMAGE (default local/python:3.11-slim) with the torch
# wheel pip's find-links folder holds (copied into docker/wheels/) and prepares data/tinyshakespeare.txt
# on the host (python -m producer prepare, umask 022) into the folder mounted at /data, then,
# each phase timed:
#   up        docker compose up --scale producer=3, the producers on the prepared corpus (the image
#             runs as uid 1000: it reads what prepare made); the trainer turns healthy; /diagnostics
#             shows 3 producers with distinct ids, each consumed, nothing rejected, the loss finite
#             and falling
#   scale     --scale producer=1: training goes on, the stopped producers' silence shows; back to 3
#   restart   one producer container restarted mid-run: training goes on, and the trainer's cursor
#             stays at k = step (batch 8 = rows per message 8): no k repeated or skipped
#   resume    SIGKILL of the trainer container, `up -d trainer`: it resumes from its checkpoint
#             (the step goes on, the cursor with it) and the producers reconnect by themselves
#   remote    docker-compose.producers.yml (the producers-only host) adds a producer
#   prom      Prometheus (Debian's package, when installed) scrapes /metrics every second; its
#             HTTP API returns the trainer's step and train loss; promtool check metrics is clean
#   curve     keys from `python -m shared.curve keygen`: the stack trains with CurveZMQ on, and a
#             producer whose key is not authorized gets nothing in (counted; the trainer unaffected)
# It talks only to the 127.0.0.1 ports it publishes and, inside, between the containers of its own
# compose network; `docker compose down -v` runs in a trap whatever happens, and so does the
# removal of the image it built (its own tag, linepack-e2e:$PROJECT, never the user's
# linepack:cpu), so a test run leaves no image behind. Bounded: every wait has a deadline and
# every docker command a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-local/python:3.11-slim}
PROJECT=${PROJECT:-linepack-e2e}
export LINEPACK_IMAGE=linepack-e2e:$PROJECT  # both compose files build and run this tag; removed at the end
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/linepack-e2e.XXXX)
HTTP_PORT=$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
PROM_PORT=$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
URL=http://127.0.0.1:$HTTP_PORT
START=$(date +%s)
PHASE_START=$START
PROM_PID=

# A small, fast stack: one-layer model, short rows, a checkpoint every 20 steps, one torch thread.
export LINEPACK_PUBLISH_HTTP=127.0.0.1:$HTTP_PORT LINEPACK_DATA_DIR=$WORK/data LINEPACK_KEYS_DIR=$WORK/keys \
       LINEPACK_HEALTH_INTERVAL=2s LINEPACK_MAX_ITERS=1000000 LINEPACK_BATCH_SIZE=8 LINEPACK_N_LAYER=1 \
       LINEPACK_N_HEAD=2 LINEPACK_N_EMBD=32 LINEPACK_BLOCK_SIZE=64 LINEPACK_ROWS_PER_MESSAGE=8 LINEPACK_EVAL_INTERVAL=20 \
       LINEPACK_EVAL_BATCHES=2 LINEPACK_LOG_INTERVAL=5 LINEPACK_THREADS=1 LINEPACK_STATUS_EVERY=2 \
       LINEPACK_LR=3e-3 LINEPACK_WARMUP_ITERS=10
mkdir -p "$WORK/data" "$WORK/keys"

compose() { timeout 300 docker compose -p "$PROJECT" "$@"; }
# The producers-only project, with the network file that joins it to the trainer's (down needs it too).
remote_compose() {
    local files=(-f docker-compose.producers.yml)
    [[ -f $WORK/remote-network.yml ]] && files+=(-f "$WORK/remote-network.yml")
    LINEPACK_CONNECT=tcp://trainer:5555 timeout 300 docker compose -p "$PROJECT-remote" "${files[@]}" "$@"
}
say() { echo "[e2e +$(( $(date +%s) - START ))s] $*"; }
phase() { say "phase $1 took $(( $(date +%s) - PHASE_START )) s"; PHASE_START=$(date +%s); }
fail() { say "FAILED: $*"; compose logs --tail 40 trainer >&2 || true; exit 1; }
cleanup() {
    local code=$?
    [[ -n $PROM_PID ]] && kill "$PROM_PID" 2>/dev/null || true
    remote_compose down -v --remove-orphans >/dev/null 2>&1 || true
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    timeout 60 docker rm -f "$PROJECT-stranger" >/dev/null 2>&1 || true
    timeout 120 docker image rm -f "$LINEPACK_IMAGE" >/dev/null 2>&1 && say "removed the image $LINEPACK_IMAGE" || true
    # A rebuild of the tag (each compose file builds it) leaves the previous image untagged: those too.
    timeout 120 docker image prune -f --filter "label=com.docker.compose.project=$PROJECT" >/dev/null 2>&1 || true
    timeout 120 docker image prune -f --filter "label=com.docker.compose.project=$PROJECT-remote" >/dev/null 2>&1 || true
    rm -rf "$WORK"
    say "cleaned up (exit $code)"
}
trap cleanup EXIT

diagnostics() { curl -sf --max-time 5 "$URL/diagnostics"; }
# wait_for SECONDS WHAT PYTHON-EXPRESSION-ON-d: polls /diagnostics until the expression holds.
wait_for() {
    local seconds=$1 what=$2 check=$3 deadline=$(( $(date +%s) + $1 ))
    while (( $(date +%s) < deadline )); do
        if diagnostics 2>/dev/null | "$PYTHON" -c "import json, math, sys; d = json.load(sys.stdin); sys.exit(0 if ($check) else 1)" 2>/dev/null; then
            say "ok: $what"; return 0
        fi
        sleep 1
    done
    fail "$what (within $seconds s); last /diagnostics: $(diagnostics | head -c 1500 || true)"
}
step_now() { diagnostics | "$PYTHON" -c "import json, sys; print(json.load(sys.stdin)['step'])"; }

# ---- build -------------------------------------------------------------------------------
WHEELS=$(pip config get global.find-links 2>/dev/null || true)
for wheel in ${WHEELS:+$WHEELS/torch-*+cpu-*.whl}; do
    [[ -f $wheel ]] && { ln -f "$wheel" docker/wheels/ 2>/dev/null || cp "$wheel" docker/wheels/; }
done
ls docker/wheels/torch-*.whl >/dev/null 2>&1 || say "no torch wheel in docker/wheels: the build takes torch from pip's index"
compose build --build-arg BASE_IMAGE="$BASE_IMAGE" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "build"; }
(umask 022 && "$PYTHON" -m producer prepare --corpus data/tinyshakespeare.txt --workers 2 --out "$WORK/data/prepared") \
    >"$WORK/prepare.log" 2>&1 || { tail -5 "$WORK/prepare.log"; fail "prepare"; }
export LINEPACK_CORPUS=/data/prepared  # every producer, the producers-only host's too
say "ok: prepared corpus at /data/prepared, mode $(stat -c %a "$WORK/data/prepared")"
phase build

# ---- up --scale producer=3 ---------------------------------------------------------------
compose up -d --scale producer=3 >/dev/null 2>&1 || fail "compose up"
deadline=$(( $(date +%s) + 120 ))
until [[ $(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q trainer)" 2>/dev/null) == healthy ]]; do
    (( $(date +%s) < deadline )) || fail "the trainer did not turn healthy within 120 s"
    sleep 1
done
say "ok: the trainer is healthy"
wait_for 90 "3 producers with distinct ids, each consumed, nothing rejected" \
    "len(d['stream']['producers']) == 3 and all(p['consumed'] > 0 for p in d['stream']['producers'].values()) and d['stream']['rejected_total'] == 0"
first=$(diagnostics | "$PYTHON" -c "import json, sys; d = json.load(sys.stdin); print(d['loss']['train'])")
wait_for 90 "the train loss is finite and falling (from $first)" \
    "d['loss']['train'] is not None and math.isfinite(d['loss']['train']) and d['loss']['train'] < $first - 0.2"
phase up

# ---- scale down and up ------------------------------------------------------------------------
compose up -d --scale producer=1 --no-recreate >/dev/null 2>&1 || fail "scale to 1"
step=$(step_now)
wait_for 60 "one producer feeds on (step past $step), two silent for over 5 s" \
    "d['step'] > $step + 20 and sorted(p['seconds_since_last'] > 5 for p in d['stream']['producers'].values()) == [False, True, True]"
compose up -d --scale producer=3 --no-recreate >/dev/null 2>&1 || fail "scale back to 3"
wait_for 60 "3 producers sending again" \
    "sum(p['seconds_since_last'] < 3 for p in d['stream']['producers'].values()) == 3"
phase scale

# ---- restart one producer mid-run ---------------------------------------------------------------
# Batch 8 and 8 rows per message: batch n is train message k = n - 1, so the cursor (the next k)
# equals the step whatever the producers do; it may run one ahead of the step the page shows.
CURSOR_IS_STEP="d['stream']['train_k'] is not None and 0 <= d['stream']['train_k'] - d['step'] <= 1"
step=$(step_now)
timeout 60 docker restart "$(compose ps -q producer | head -1)" >/dev/null || fail "docker restart of a producer"
wait_for 90 "a producer restarted: training goes on (step past $step + 20), the cursor at k = step" \
    "d['step'] > $step + 20 and $CURSOR_IS_STEP"
phase restart

# ---- SIGKILL the trainer, resume --------------------------------------------------------------
step=$(step_now)
timeout 60 docker kill -s KILL "$(compose ps -q trainer)" >/dev/null || fail "docker kill"
compose up -d --no-recreate trainer >/dev/null 2>&1 || compose up -d trainer >/dev/null 2>&1 || fail "up -d trainer"
wait_for 90 "the trainer resumed from its checkpoint (step past $step, not from 0) and the producers reconnected" \
    "d['status'] == 'training' and d['step'] > $step and sum(p['consumed'] > 0 for p in d['stream']['producers'].values()) >= 3 and $CURSOR_IS_STEP"
# Read whole, then searched: `compose logs | grep -q` fails under pipefail when grep stops reading early.
trainer_log=$(compose logs trainer 2>/dev/null || true)
grep -q "resumed from /runs/ckpt.pt" <<<"$trainer_log" || fail "no 'resumed from' line in the trainer log"
say "ok: $(grep -o 'resumed from /runs/ckpt.pt at step [0-9]*' <<<"$trainer_log" | tail -1)"
phase resume

# ---- a producers-only host joins ----------------------------------------------------------------
cat >"$WORK/remote-network.yml" <<EOF
networks:
  default:
    name: ${PROJECT}_default
    external: true
EOF
remote_compose up -d >/dev/null 2>&1 || fail "producers-only compose up"
wait_for 60 "the producers-only host adds a fourth producer" \
    "sum(p['consumed'] > 0 and p['seconds_since_last'] < 3 for p in d['stream']['producers'].values()) == 4"
remote_compose down >"$WORK/remote-down.log" 2>&1 || true  # its network is the trainer's, still in use
[[ -z $(timeout 30 docker ps -aq --filter "label=com.docker.compose.project=$PROJECT-remote") ]] \
    || fail "the producers-only host's containers are still there: $(cat "$WORK/remote-down.log")"
phase remote

# ---- Prometheus scrapes /metrics ----------------------------------------------------------------------
curl -sf "$URL/metrics" >"$WORK/metrics.txt" || fail "GET /metrics"
if command -v promtool >/dev/null; then
    lint=$(promtool check metrics <"$WORK/metrics.txt" 2>&1 || true)
    [[ -z $lint ]] || fail "promtool check metrics: $lint"
    say "ok: promtool check metrics reports nothing"
fi
if command -v prometheus >/dev/null; then
    cat >"$WORK/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: linepack
    static_configs: [{targets: ["127.0.0.1:$HTTP_PORT"]}]
EOF
    prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
        --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
    PROM_PID=$!
    query() { curl -sf --max-time 5 "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1"; }
    deadline=$(( $(date +%s) + 30 ))
    until result=$(query 'linepack_step' 2>/dev/null) && grep -q '"result":\[{' <<<"$result"; do
        (( $(date +%s) < deadline )) || fail "Prometheus returned no linepack_step within 30 s"
        sleep 1
    done
    say "Prometheus: linepack_step -> $result"
    say "Prometheus: linepack_loss_nats{split=\"train\"} -> $(query 'linepack_loss_nats{split="train"}')"
else
    say "skipped the Prometheus server: Debian's prometheus package is not installed (apt-get install prometheus)"
fi
phase prom

# ---- CurveZMQ ------------------------------------------------------------------------------------------
compose down >/dev/null 2>&1 || true
"$PYTHON" -m shared.curve keygen "$WORK/keys" trainer producer stranger >/dev/null
mkdir -p "$WORK/keys/authorized" && cp "$WORK/keys/producer.key" "$WORK/keys/authorized/"
chmod -R a+rX "$WORK/keys"  # the containers run as another user
export LINEPACK_CURVE_SECRET_KEY=/keys/trainer.key_secret LINEPACK_CURVE_AUTHORIZED_KEYS=/keys/authorized \
       LINEPACK_CURVE_SECRET_KEY_PRODUCER=/keys/producer.key_secret LINEPACK_CURVE_SERVER_KEY=/keys/trainer.key
compose up -d --scale producer=2 >/dev/null 2>&1 || fail "compose up with Curve"
wait_for 120 "with CurveZMQ on, 2 authorized producers feed the trainer" \
    "d['step'] > 10 and sum(p['consumed'] > 0 for p in d['stream']['producers'].values()) == 2 and d['stream']['curve_accepted'] >= 2"
step=$(step_now)
LINEPACK_CURVE_SECRET_KEY_PRODUCER=/keys/stranger.key_secret compose run -d --no-deps --name "$PROJECT-stranger" producer >/dev/null \
    || fail "start the unauthorized producer"
wait_for 60 "the unauthorized producer is refused (counted), nothing of it got in, training goes on" \
    "d['stream']['curve_refused'] >= 1 and len(d['stream']['producers']) == 2 and d['stream']['rejected_total'] == 0 and d['step'] > $step + 10"
timeout 60 docker rm -f "$PROJECT-stranger" >/dev/null 2>&1 || true
phase curve

say "passed in $(( $(date +%s) - START )) s"
