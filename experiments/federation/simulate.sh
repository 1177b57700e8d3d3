#!/usr/bin/env bash
# `flwr run .` for the demo cohort, without surprises: one virtual SuperNode per site, the project's
# own venv (no `uv sync` of a multi-GB runtime), absolute paths, and the local SuperLink stopped after.
#
#   experiments/federation/simulate.sh DATA_ROOT [OUT_DIR] [extra --run-config pairs]
#
# e.g.  experiments/federation/simulate.sh demo_out/data runs/federated "set='federation.local_steps=5'"
# DATA_ROOT holds site_0/, site_1/, ... (nnU-Net raw datasets, as `gem3d demo-data` writes them).
# SIM_PORT (default 39191) is the local SuperLink's port; FLWR_HOME defaults to OUT_DIR/../flwr-home.
set -euo pipefail

[[ $# -ge 1 ]] || { sed -n '2,9p' "$0"; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DATA_ROOT=$(cd "$1" && pwd) || { echo "simulate: $1: no such data root" >&2; exit 2; }
OUT_DIR=$(realpath -m "${2:-$REPO/runs/federated}")
EXTRA=${3:-}
SITES=$(find "$DATA_ROOT" -mindepth 1 -maxdepth 1 -type d -name 'site_*' | wc -l)
[[ $SITES -ge 1 ]] || { echo "simulate: $DATA_ROOT has no site_*/ folders" >&2; exit 2; }

# One Python runs every process: $PYTHON, else the python3 on PATH (a venv, conda or system
# install with gem3d in it); its bin folder holds flwr and the Flower executables. The SuperLink
# must not `uv sync` a fresh runtime per run.
PYTHON=${PYTHON:-$(command -v python3 || command -v python || true)}
[[ -n "$PYTHON" ]] || { echo "simulate: no python3 on PATH; set PYTHON=/path/to/python" >&2; exit 2; }
"$PYTHON" -c 'import gem3d, flwr' 2>/dev/null \
    || { echo "simulate: $PYTHON cannot import gem3d and flwr; run 'make test' (or pip install -e .) or set PYTHON" >&2; exit 2; }
export PATH="$(dirname "$PYTHON"):$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # read by the SuperLink that `flwr run` starts
export FLWR_HOME=${FLWR_HOME:-$(dirname "$OUT_DIR")/flwr-home}
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=${SIM_PORT:-39191}
PORT=$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT
mkdir -p "$FLWR_HOME"

superlink_pid() { ss -ltnpH "sport = :$PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
if [[ -n "$(superlink_pid)" ]]; then
    echo "simulate: port $PORT is taken (a SuperLink started elsewhere may install dependencies); set SIM_PORT" >&2
    exit 2
fi
stop_superlink() {
    # `flwr run` starts the local SuperLink detached; stop the one on our port, which this script started.
    local pid
    pid=$(superlink_pid)
    [[ -n "$pid" ]] && kill "$pid" && echo "stopped the local SuperLink (pid $pid)"
    return 0
}
trap stop_superlink EXIT

# `gem3d demo-data` also writes a test/ split: the server scores the global model on it every round.
SERVER_DATA=""
[[ -d "$DATA_ROOT/test/labelsTr" ]] && SERVER_DATA="server-data='$DATA_ROOT/test'"

cd "$REPO"
submitted=$(flwr run . --format json --federation-config "num-supernodes=$SITES" \
    --run-config "data-root='$DATA_ROOT' out-dir='$OUT_DIR' $SERVER_DATA $EXTRA")
RUN_ID=$("$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["run-id"])' <<<"$submitted")
echo "run $RUN_ID: $SITES site(s) from $DATA_ROOT -> $OUT_DIR"
while :; do
    status=$(flwr list --run-id "$RUN_ID" --format json | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
    [[ $status == finished* ]] && break
    sleep 5
done
flwr log "$RUN_ID" >"$(dirname "$OUT_DIR")/flwr-run-$RUN_ID.log" 2>&1 || true
echo "run $RUN_ID: $status; ServerApp log: $(dirname "$OUT_DIR")/flwr-run-$RUN_ID.log"
[[ $status == "finished:completed" ]] || exit 1
echo "final model: $OUT_DIR (gem3d sample --checkpoint $OUT_DIR ...)"
