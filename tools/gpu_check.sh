#!/usr/bin/env bash
# The GPU figures of lab/docs/benchmarks.md (its bench steps run where lab/ is), in 8 minutes or less, on a GPU machine with no network.
#
#     tools/gpu_check.sh [OUT]          # OUT: default $OUT, else runs/gpu_check
#
# Writes under OUT: nvidia-smi.txt, one STEP.log (env.log: versions) per step, bench_eager.json, bench_compile.json,
# train_128px/ (config, metrics, summary, curves), train_torchrun/ (the same), status.txt (one line per step).
# Big files (the VAE, the latent cache, checkpoints) go to a scratch directory that is deleted at the end.
# A step that fails or runs out of time is recorded in status.txt and the next one runs; the exit status is 1
# if any step failed.
set -euo pipefail
OUT_DIR=$(realpath -m "${1:-${OUT:-runs/gpu_check}}")   # resolved before the cd below
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
: >"$OUT_DIR/status.txt"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
BENCH=(-m lab.bench)
DEADLINE=$((SECONDS + ${BUDGET_S:-470}))                  # the whole script stays under 8 minutes
FAILED=0

# step NAME MAX_SECONDS COMMAND...: run COMMAND under `timeout` (at most MAX_SECONDS, and never past DEADLINE),
# its stdout and stderr in OUT/NAME.log, its outcome in OUT/status.txt.
step() {
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) rc=0
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 15)); then echo "$name: skipped, out of time" | tee -a "$OUT_DIR/status.txt"; FAILED=1; return; fi
    echo "== $name (up to ${limit} s): $*"
    timeout -k 20 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1 || rc=$?
    local note=""; ((rc == 124)) && note=", timed out after $limit s"
    echo "$name: exit status $rc$note; ${SECONDS} s since the start" | tee -a "$OUT_DIR/status.txt"
    ((rc == 0)) || FAILED=1
}

# 1. The machine.
timeout 30 nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true
timeout 30 nvidia-smi topo -m >>"$OUT_DIR/nvidia-smi.txt" 2>&1 || true
step env 30 python -c "import torch, diffusers, sys; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, torch.cuda.get_device_name(),
'bf16', torch.cuda.is_bf16_supported(including_emulation=False))"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true); ((GPUS > 0)) || GPUS=1

# 2. bench.py on the GPU, eager: bf16 autocast, batch 256 (its GPU plan). Random-weight VAEs: no download.
step bench_eager 150 python "${BENCH[@]}" --device cuda --precision bf16 --json-out "$OUT_DIR/bench_eager.json"

# 3. train.py at 128 px on the synthetic set, with a VAE in the full SD layout (what stabilityai/sd-vae-ft-mse
#    holds) but RANDOM weights, saved locally so that it needs no network. The timings are the SD VAE's (the
#    cache build) and the small model's; the losses mean nothing. (--vae tiny is SD-layout too, but much
#    narrower, so its encoding time is not the SD VAE's.)
step make_vae 60 python -c "import sys; from diffusers import AutoencoderKL; import torch; torch.manual_seed(0)
AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
    down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
    scaling_factor=0.18215).save_pretrained(sys.argv[1])" "$SCRATCH/sd_vae_random"
TRAIN=(--dataset synthetic --synthetic-size 5000 --image-size 128 --patch-size 2 --model small --batch-size 256
       --vae "$SCRATCH/sd_vae_random" --data-dir "$SCRATCH/data" --precision bf16 --grid-every 0 --log-every 20)
step train_128px 120 python train.py --device cuda "${TRAIN[@]}" --steps 400 --out "$SCRATCH/train_128px"

# 4. The same under torchrun on NCCL, reusing the latent cache of step 3. With one GPU the launcher and the
#    single-process path are checked, but train.py opens no process group (it needs WORLD_SIZE > 1), so
#    nccl_check first runs one NCCL all-reduce across all GPUs on its own.
cat >"$SCRATCH/nccl_check.py" <<'EOF'
import os, torch, torch.distributed as dist
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
x = torch.ones(1, device="cuda")
dist.all_reduce(x)
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: NCCL {torch.cuda.nccl.version()} all-reduce = {x.item()}")
dist.destroy_process_group()
EOF
step nccl_check 45 torchrun --standalone --nproc_per_node="$GPUS" "$SCRATCH/nccl_check.py"
step train_torchrun 75 torchrun --standalone --nproc_per_node="$GPUS" train.py --device cuda "${TRAIN[@]}" \
    --steps 60 --out "$SCRATCH/train_torchrun"

# 5. bench.py with --compile last: compiling takes the longest and may use up what time is left.
step bench_compile 240 python "${BENCH[@]}" --device cuda --precision bf16 --compile \
    --json-out "$OUT_DIR/bench_compile.json"

# Keep the small files of the training runs, and the training throughput between the first and last log lines.
for run in train_128px train_torchrun; do
    mkdir -p "$OUT_DIR/$run"
    cp "$SCRATCH/$run"/{config.json,metrics.jsonl,summary.json,curves.png} "$OUT_DIR/$run/" 2>/dev/null || true
    python - "$OUT_DIR/$run/metrics.jsonl" >"$OUT_DIR/$run/throughput.txt" 2>&1 <<'EOF' || true
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
batch = json.load(open(sys.argv[1].replace("metrics.jsonl", "config.json")))["batch_size"]
seconds = [r["step"] * batch / r["images_per_second"] for r in rows]   # images_per_second counts from step 0
print(f"{(rows[-1]['step'] - rows[0]['step']) * batch / (seconds[-1] - seconds[0]):.0f} images/s between steps "
      f"{rows[0]['step']} and {rows[-1]['step']} (global batch {batch}); from step 0: {rows[-1]['images_per_second']:.0f}")
EOF
done
echo "done in ${SECONDS} s; $OUT_DIR/status.txt:"; cat "$OUT_DIR/status.txt"
exit "$FAILED"
