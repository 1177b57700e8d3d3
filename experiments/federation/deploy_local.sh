#!/usr/bin/env bash
# A real Flower deployment of gem3d on this machine: TLS, SuperNode authentication, one SuperNode per site.
#
#   experiments/federation/deploy_local.sh DATA_ROOT [OUT_DIR]
#
# DATA_ROOT holds one nnU-Net raw dataset per site (site_0/, site_1/, ... as `gem3d demo-data` writes).
# The script generates a CA and a server certificate (openssl) and one EC key pair per site
# (ssh-keygen), starts a SuperLink with TLS and --enable-supernode-auth, registers the sites' public
# keys, starts one SuperNode per site with its own data-dir, checks that a SuperNode with an
# unregistered key is refused, runs the app, checks the run folder and stops everything it started.
#
# Environment:
#   RUN_CONFIG   extra `flwr run --run-config` pairs (default: a short demo, one round per stage,
#                2 local steps, no client-side evaluation: every message starts a fresh ClientApp process)
#   PORT         SuperLink port (default 39291); SuperNodes use PORT+10+k for their local runtime API
#   KILL_SITE    kill -9 this site's SuperNode once the first round is checkpointed (failure drill)
#   WORK         where certificates, keys, logs and Flower state go (default OUT_DIR/../deploy)
# Everything listens on 127.0.0.1 only. See experiments/federation/README_federation.md.
set -euo pipefail

usage() { sed -n '2,20p' "$0"; exit 2; }
[[ $# -ge 1 ]] || usage
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DATA_ROOT=$(cd "$1" && pwd) || { echo "deploy_local: $1: no such data root" >&2; exit 2; }
OUT_DIR=$(realpath -m "${2:-$REPO/runs/federated-deploy}")
WORK=$(realpath -m "${WORK:-$(dirname "$OUT_DIR")/deploy}")
PORT=${PORT:-39291}
RUN_CONFIG=${RUN_CONFIG-"set='federation.local_steps=2 federation.rounds_slice=1' fraction-evaluate=0.0"}
HOST=127.0.0.1
mapfile -t SITES < <(find "$DATA_ROOT" -mindepth 1 -maxdepth 1 -type d -name 'site_*' -printf '%f\n' | sort)
[[ ${#SITES[@]} -ge 1 ]] || { echo "deploy_local: $DATA_ROOT has no site_*/ folders" >&2; exit 2; }

# One Python runs every process: $PYTHON, else the python3 on PATH (a venv, conda or system
# install with gem3d in it); its bin folder holds flwr and the Flower executables. The SuperLink
# must not `uv sync` a fresh runtime per run.
PYTHON=${PYTHON:-$(command -v python3 || command -v python || true)}
[[ -n "$PYTHON" ]] || { echo "deploy_local: no python3 on PATH; set PYTHON=/path/to/python" >&2; exit 2; }
"$PYTHON" -c 'import gem3d, flwr' 2>/dev/null \
    || { echo "deploy_local: $PYTHON cannot import gem3d and flwr; run 'make test' (or pip install -e .) or set PYTHON" >&2; exit 2; }
export PATH="$(dirname "$PYTHON"):$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME="$WORK/flwr-home"   # a private CLI config: never touches the user's ~/.flwr
CERTS="$WORK/certs" KEYS="$WORK/keys" LOGS="$WORK/logs"
rm -rf "$WORK" && mkdir -p "$CERTS" "$KEYS" "$LOGS" "$FLWR_HOME" "$WORK/state"

PIDS=()
cleanup() {
    # Stop what this script started, newest first; SIGTERM lets Flower shut down cleanly.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[i]}" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "1/7 TLS: a development CA and a certificate for $HOST"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=gem3d-local-ca" \
    -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$HOST" -keyout "$CERTS/server.key" -out "$CERTS/server.csr" 2>/dev/null
printf 'subjectAltName=IP:%s\n' "$HOST" >"$CERTS/san.ext"
openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" -CAcreateserial \
    -days 30 -extfile "$CERTS/san.ext" -out "$CERTS/server.pem" 2>/dev/null

step "2/7 SuperNode authentication keys (EC P-384), one per site, and one never registered"
for name in "${SITES[@]}" unregistered; do
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$KEYS/$name"
done

step "3/7 SuperLink on $HOST:$PORT (TLS, --enable-supernode-auth)"
flower-superlink --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key" \
    --enable-supernode-auth --disable-runtime-dependency-installation \
    --database "$WORK/state/superlink.db" --host "$HOST" --port "$PORT" >"$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "gem3d-local"

[superlink.gem3d-local]
address = "$HOST:$PORT"
root-certificates = "$CERTS/ca.crt"
EOF
for _ in $(seq 60); do
    flwr supernode list gem3d-local >/dev/null 2>&1 && break
    kill -0 "${PIDS[0]}" 2>/dev/null || { echo "SuperLink exited; see $LOGS/superlink.log" >&2; exit 1; }
    sleep 1
done

step "4/7 register the sites' public keys"
for name in "${SITES[@]}"; do
    flwr supernode register "$KEYS/$name.pub" gem3d-local --name "$name" >"$LOGS/register-$name.log" 2>&1 \
        || { cat "$LOGS/register-$name.log" >&2; exit 1; }
    echo "registered $name"
done

step "5/7 one SuperNode per site, each with its own data-dir"
k=0
declare -A SITE_PID
for name in "${SITES[@]}"; do
    flower-supernode --root-certificates "$CERTS/ca.crt" --superlink "$HOST:$PORT" \
        --auth-supernode-private-key "$KEYS/$name" \
        --node-config "data-dir='$DATA_ROOT/$name' state-dir='$WORK/state/$name' site-index=$k site-name='$name'" \
        --host "$HOST" --port $((PORT + 10 + k)) >"$LOGS/$name.log" 2>&1 &
    PIDS+=($!)
    SITE_PID[$name]=$!
    k=$((k + 1))
done

step "6/7 a SuperNode whose key was never registered must be refused"
set +e
timeout 60 flower-supernode --root-certificates "$CERTS/ca.crt" --superlink "$HOST:$PORT" \
    --auth-supernode-private-key "$KEYS/unregistered" --max-retries 2 --max-wait-time 20 \
    --node-config "data-dir='$DATA_ROOT/${SITES[0]}'" --host "$HOST" --port $((PORT + 9)) >"$LOGS/unregistered.log" 2>&1
refused=$?
set -e
# The SuperLink answers the activation of an unknown key with ApiError 2004 (HTTP 412); the node exits 305.
if [[ $refused -eq 0 ]] || ! grep -q "Failed to activate SuperNode" "$LOGS/unregistered.log" \
    || ! grep -q "ApiError:2004" "$LOGS/superlink.log"; then
    echo "FAILED: the unregistered SuperNode was not refused (exit $refused); see $LOGS/unregistered.log" >&2
    exit 1
fi
echo "refused as expected: SuperNode exit $refused, SuperLink: $(grep -m1 -o "ApiError:2004\] Attempted to register SuperNode" "$LOGS/superlink.log")"

step "7/7 run the app on ${#SITES[@]} site(s); results in $OUT_DIR"
if [[ -n "${KILL_SITE:-}" ]]; then
    victim=${SITE_PID[$KILL_SITE]:?KILL_SITE must be one of ${SITES[*]}}
    (
        while [[ ! -s "$OUT_DIR/metrics.jsonl" ]]; do sleep 0.5; done
        echo "failure drill: kill -9 $KILL_SITE (pid $victim) during round 2"
        kill -9 "$victim"
    ) &
    PIDS+=($!)
fi
submitted=$(flwr run "$REPO" gem3d-local --format json --run-config "out-dir='$OUT_DIR' data-root='' ${RUN_CONFIG:-}")
RUN_ID=$("$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["run-id"])' <<<"$submitted")
echo "run $RUN_ID submitted; rounds as they complete:"
shown=0
while :; do
    status=$(flwr list --run-id "$RUN_ID" gem3d-local --format json \
        | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
    if [[ -s "$OUT_DIR/metrics.jsonl" ]]; then
        "$PYTHON" - "$OUT_DIR/metrics.jsonl" "$shown" <<'PY'
import json, sys
for line in open(sys.argv[1]).read().splitlines()[int(sys.argv[2]):]:
    r = json.loads(line)
    failed = "; ".join(r.get("failures", [])) or "none"
    print(f"  {r['stage']} round {r['round']}: train loss {r.get('train', {}).get('loss', float('nan')):.4f}, "
          f"{r['sites-ok']} site(s) ok, failed: {failed}")
PY
        shown=$(wc -l <"$OUT_DIR/metrics.jsonl")
    fi
    [[ $status == finished* ]] && break
    sleep 5
done
flwr log "$RUN_ID" gem3d-local >"$LOGS/run.log" 2>&1 || true
echo "run $RUN_ID: $status (ServerApp log: $LOGS/run.log)"
[[ $status == "finished:completed" ]] || exit 1
"$PYTHON" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
from gem3d.runs import load_model
out = Path(sys.argv[1])
state = json.loads((out / "server_state.json").read_text())
for stage in ("slice", "volume", "informed"):
    if state["completed"].get(stage):
        _, _, meta = load_model(out / f"{stage}.safetensors")
        print(f"{stage}: {meta['rounds']} round(s), step {meta['step']}")
print(f"run folder ready: {out}")
EOF
