#!/usr/bin/env bash
# The GPU machine's steps, from the repository root: bash gdn2ts/bench/gpu_steps.sh STEP...
#   new      GPU tests of the fused activations, gated norm, conv (packed) and the layer on its kernels
#   suite    the GPU suite: tests/kernels tests/layers tests/ops, then tests/streaming
#   layer    python -m gdn2ts.bench.layer (ours against FLA's layer, same process)
#   profile  python -m gdn2ts.bench.profile_layer (our layer's kernels ranked by CUDA time)
#   kernels  python -m gdn2ts.bench.kernels --no-decode (the op, raw-input and fixed/packed rows, against FLA)
#   raw      python -m gdn2ts.bench.kernels --raw-only
#   fla      the baselines against FLA's layers (tests/lm/test_fla_parity.py; FLA's wheels in .whl/)
#   lm16k    training tokens/s of swa_gdn2_1.3B at 16K context (compiled; with and without activation checkpointing)
#   lm2k     the same at 2K context (compiled, 8,192-token micro-batches)
#   fsdp     DDP, FSDP1 and FSDP2 on two GPUs through gdn2ts lm train (python -m gdn2ts.bench.fsdp), then the FSDP2
#            run resumed on one GPU; needs two GPUs (nvidia-h100-x2), jsonargparse's wheels in .whl/ and the text in
#            .devcarry/tinyshakespeare.txt, both carried (docs/lm-training.md)
#   mqar     one shard of the MQAR grid (tasks/lm/mqar/zoology.yaml; docs/lm-eval.md, "MQAR, Zoology protocol"):
#            MQAR_SHARD=i/n (default 1/4), MQAR_WORKERS runs at once (6), MQAR_STOP seconds after which no run
#            starts (380), MQAR_ARGS more options (no spaces inside one), MQAR_OUT the folder (mqar-zoology). The
#            runs already in docs/results/$MQAR_OUT are copied to $OUT/$MQAR_OUT first and skipped; the new run
#            files and the rebuilt report come back there. Needs jsonargparse's wheels in .whl/, carried
# Each step runs in its own process under a time limit; its log goes to $OUT/<step>.log (JSON records beside it)
# and its last lines to stdout. The package is copied to /tmp/w with kernels/ as gdn2ts/kernels (no install
# needed); FLA 0.6.0 comes as wheels in .whl/.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
W=/tmp/w
ROOT=$PWD
rm -rf "$W" && mkdir -p "$W"
cp -r gdn2ts tests tasks pyproject.toml "$W"/ && rm -rf "$W/gdn2ts/kernels" && cp -r kernels "$W/gdn2ts/kernels"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$W PYTHONUNBUFFERED=1
cd "$W" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0)) s"
    tail -n "${TAIL:-15}" "$OUT/$name.log"
}

for s in "$@"; do
    case $s in
        new) step new 360 python3 -m pytest -q -m gpu tests/kernels/test_act_kernel.py tests/kernels/test_norm_kernel.py \
                 tests/kernels/test_conv_kernel.py tests/layers/test_gdn2_kernels.py tests/layers/test_attention_flex.py ;;
        suite) step suite 480 python3 -m pytest -q -m gpu tests/kernels tests/layers tests/ops
               step streaming 120 python3 -m pytest -q -m gpu tests/streaming ;;
        layer) step layer 360 python3 -m gdn2ts.bench.layer --json "$OUT/bench_layer.json" ;;
        profile) step profile 240 python3 -m gdn2ts.bench.profile_layer --json "$OUT/profile_layer.json" ;;
        kernels) step kernels 540 python3 -m gdn2ts.bench.kernels --no-decode --json "$OUT/bench_kernels.json" ;;
        raw) step raw 300 python3 -m gdn2ts.bench.kernels --raw-only --json "$OUT/bench_raw.json" ;;
        fla) TAIL=${TAIL:-80} step fla 540 python3 -m pytest -q -s -m gpu tests/lm/test_fla_parity.py ;;
        lm16k) step lm16k_ckpt 300 python3 -c "from gdn2ts.lm.throughput import measure_throughput as m; m('swa_gdn2_1.3B', seq_lens=(16384,), tokens_per_step=32768, micro_tokens=16384, steps=3, warmup=2, compile=True, activation_checkpointing=True, json_path='$OUT/lm16k_ckpt.json')"
               step lm16k 300 python3 -c "from gdn2ts.lm.throughput import measure_throughput as m; m('swa_gdn2_1.3B', seq_lens=(16384,), tokens_per_step=32768, micro_tokens=16384, steps=3, warmup=2, compile=True, json_path='$OUT/lm16k.json')" ;;
        lm2k) step lm2k 300 python3 -c "from gdn2ts.lm.throughput import measure_throughput as m; m('swa_gdn2_1.3B', seq_lens=(2048,), tokens_per_step=32768, micro_tokens=8192, steps=6, warmup=3, compile=True, json_path='$OUT/lm2k.json')" ;;
        fsdp) text="[$ROOT/.devcarry/tinyshakespeare.txt]"
              step fsdp 420 python3 -m gdn2ts.bench.fsdp --recipe tasks/lm/train/small_shakespeare.yaml --devices 2 \
                  --steps 60 --out /tmp/runs/fsdp --json "$OUT/fsdp_gpu.json" --set --data.paths "$text"
              step fsdp_resume 180 python3 -m gdn2ts.cli lm train tasks/lm/train/small_shakespeare.yaml \
                  --data.paths "$text" --out /tmp/runs/fsdp/fsdp2 --train.max_steps 80 --train.grad_accum 2 --quiet true
              cp /tmp/runs/fsdp/fsdp2/summary.json "$OUT/fsdp_resume_summary.json" ;;
        mqar) mq=${MQAR_OUT:-mqar-zoology}
              mkdir -p "$OUT/$mq"
              if [ -d "$ROOT/docs/results/$mq" ]; then cp -r "$ROOT/docs/results/$mq/." "$OUT/$mq/"; fi
              # shellcheck disable=SC2086  # MQAR_ARGS is split into options on purpose
              TAIL=${TAIL:-30} step mqar 560 python3 -m gdn2ts.cli lm mqar-grid --config tasks/lm/mqar/zoology.yaml \
                  --out "$OUT/$mq" --shard "${MQAR_SHARD:-1/4}" --workers "${MQAR_WORKERS:-6}" \
                  --stop_after_s "${MQAR_STOP:-380}" ${MQAR_ARGS:-} ;;
        *) echo "unknown step $s" ;;
    esac
done
