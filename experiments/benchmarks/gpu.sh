#!/usr/bin/env bash
# The GPU checks and benchmarks in one short run (issue 16, items 1, 2 and 7): the CUDA tests, then
# training throughput and MFU at the brats and abdomenct1k configs, the cost of deterministic
# kernels and what torch.compile gains, a 155-slice brats volume at the config's own recipe, and
# data loading against the step rate. Each part has its own time limit, so one that hangs does not
# take the others with it.
#
#     experiments/benchmarks/gpu.sh OUT_DIR [PYTHON] [PART ...]
#
# PARTS (default all): tests brats nondeterministic sampling abdomenct1k loading compile batch16 cudagraphs.
# OUT_DIR receives gpu.log and one JSON per benchmark; PYTHON defaults to python3. Copy the tables
# into RESULTS.md with the date and the machine (the log's first lines). About 7 minutes on an H200
# without batch16 and cudagraphs (not yet run: allow 5 more; pass PARTS to run fewer).
set -u
out=${1:?usage: gpu.sh OUT_DIR [PYTHON] [PART ...]}
py=${2:-python3}
shift $(($# < 2 ? $# : 2))
parts=${*:-tests brats nondeterministic sampling abdomenct1k loading compile batch16 cudagraphs}
mkdir -p "$out"
log="$out/gpu.log"
export PYTHONUNBUFFERED=1
bench=experiments/benchmarks

part() {  # part KEY SECONDS COMMAND...: run COMMAND with a limit if KEY is asked for; log output and exit status
    local key=$1 limit=$2
    shift 2
    [[ " $parts " == *" $key "* ]] || return 0
    echo "=== $key ($(date -u +%H:%M:%S))" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $key: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)"
    nproc
} 2>&1 | tee -a "$log"

part tests 240 "$py" -m pytest -p no:cacheprovider -q -rA tests/test_cuda.py
part sampling 90 "$py" $bench/sampling.py --config brats --size 128 --depths 155 --steps 20 --device cuda \
    --no-baseline --no-cube --json "$out/sampling_brats.json"
part brats 120 "$py" $bench/train_throughput.py --config brats --device cuda --steps 20 \
    --json "$out/train_brats.json"
part nondeterministic 60 "$py" $bench/train_throughput.py --config brats --device cuda --steps 20 --stages slice \
    --set accel.deterministic=false --json "$out/train_brats_nondeterministic.json"
part abdomenct1k 150 "$py" $bench/train_throughput.py --config abdomenct1k --device cuda --steps 20 \
    --json "$out/train_abdomenct1k.json"
part loading 80 "$py" $bench/data_loading.py --config brats --device cuda --workers 4 --steps 20
part compile 150 "$py" $bench/train_throughput.py --config brats --device cuda --steps 20 --stages slice \
    --set accel.compile=true --json "$out/train_brats_compile.json"
part batch16 120 "$py" $bench/train_throughput.py --config brats --device cuda --steps 20 --stages slice \
    --set train.batch_size=16 --json "$out/train_brats_batch16.json"
part cudagraphs 180 "$py" $bench/train_throughput.py --config brats --device cuda --steps 20 --stages slice,volume \
    --set accel.compile=true --set accel.compile_mode=reduce-overhead --json "$out/train_brats_cudagraphs.json"
echo "=== done ($(date -u +%H:%M:%S))" | tee -a "$log"
