"""
LMD speed benchmark: is pretraining on cached latents really faster than pixel MAE? One command, one run.

    python -m lab.bench                         # full run: under 5 minutes on a 2-core CPU
    python -m lab.bench --quick                 # under a minute: smaller batches, fewer rounds
    python -m lab.bench --device cuda --compile # a GPU, bf16 autocast, torch.compile

What it measures, side by side on one device in one process:
  a. pretraining images/s of LMD on cached latents against the pixel MAE baseline (--vae none): at the paper's
     setting (ViT-B, 224 px, latent patch 4 against pixel patch 16, mask ratio 0.75) and at a CPU-sized setting
     (train.py's CIFAR geometry: small model, 128 px, latent patch 2 against pixel patch 8);
  b. LMD that encodes every batch with the VAE (SD VAE layout, TAESD layout) against cached latents, same batch;
  c. model FLOPs utilisation (MFU): the step's counted model FLOPs per second over the FLOP/s of a large dense
     matmul in the same dtype timed in the same rounds (not the datasheet peak; that ratio is reported too, for
     the GPUs of NOMINAL_BF16_TFLOPS);
  d. peak memory of each step;
  e. classifier inference images/s: a latent ViT-B/4 with its VAE encoder against a pixel ViT-B/16;
  f. each objective's training step (lab/: ddpm with no mask, MaskDM with 0.75 of its tokens dropped in
     blocks) beside LMD's at 0.75, the same model on the same cached latents at the CPU-sized setting.

How: a training step is what train.py does (take a batch, forward with the mask ratio, backward, AdamW step).
Each row runs warm-up iterations, one untimed iteration that counts FLOPs (torch.utils.flop_counter) and, on the
CPU, peak memory (torch.profiler), then timed iterations. The rows of a group are timed in interleaved rounds, so
a machine that gets busier mid-run slows all of them alike; each row reports its median. The VAEs are randomly
initialised with the real architectures: their speed is the trained ones'. The last stdout line is one JSON object.
"""

import gc
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import lmd
import lab
from util import cli
from util import datasets
from util import devices
from util import optim
from util import vaes

# ----------------------------------------------------------------------------------------------------------------
# Defaults and settings, in one block.
DEFAULTS = dict(mode="full", device="auto", precision="auto", compile=False, threads=None, seed=0, json_out=None)

MASK_RATIO = 0.75  # MAE's ratio and the end of LMD's schedule: the steady state of a long run
PAPER = dict(name="paper", model="base", image_size=224, latent_patch=4, pixel_patch=16)
CPU_SIZED = dict(name="cpu-sized", model="small", image_size=128, latent_patch=2, pixel_patch=8)
SMOKE = dict(name="smoke", model="tiny", image_size=32, latent_patch=2, pixel_patch=8)   # --smoke only
TARGETS = dict(speedup_vs_pixel_mae=3.5, cache_speedup=10.0, mfu=0.5)                   # from the issue
# Dense (no sparsity) bf16 TFLOP/s from the vendors' datasheets, by a part of the device's name; the first match
# wins, so the more specific names come first. Another device, or another dtype, has no nominal MFU ("unknown").
NOMINAL_BF16_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312),
                       ("L40S", 362), ("L40", 181), ("L4", 121))
STORE_BATCHES = 4  # the fake dataset holds this many batches, so batches are gathered like real ones

# Batch sizes and iteration counts. train: pretraining batch at the paper setting; small: at the CPU-sized
# setting; cache: group b's batch, the training batch of group a (cached latents against encoding every batch is a
# question about training throughput, and at a tiny batch the per-step optimiser pass hides the VAE's cost;
# batch 4 gave 7.4x where batch 32 gives the number below); vae: batch of group e's rows that run a VAE on 224 px
# images (the SD VAE encoder costs ~200 GFLOPs an
# image, more than a whole LMD training step); infer: classifier batch. warmup: plain iterations before the
# counting one (which warms up too); rounds: timed rounds (vae_rounds for the VAE rows); matmul: the MFU reference.
PLANS = {
    ("full", "cpu"): dict(train=32, small=64, cache=32, vae=4, infer=16, warmup=1, rounds=3, vae_rounds=1, matmul=4096),
    ("quick", "cpu"): dict(train=8, small=32, cache=8, vae=2, infer=8, warmup=0, rounds=2, vae_rounds=1, matmul=2048),
    ("full", "gpu"): dict(train=256, small=256, cache=256, vae=64, infer=256, warmup=3, rounds=10, vae_rounds=5,
                          matmul=8192),
    ("quick", "gpu"): dict(train=128, small=256, cache=128, vae=32, infer=128, warmup=2, rounds=5, vae_rounds=3,
                           matmul=8192),
    ("smoke", "cpu"): dict(train=4, small=4, cache=2, vae=2, infer=4, warmup=0, rounds=2, vae_rounds=1, matmul=256),
}
PLANS[("smoke", "gpu")] = PLANS[("smoke", "cpu")]


def build_parser():
    parser = cli.ArgumentParser(description="LMD speed benchmark: LMD vs pixel MAE, cached vs on-the-fly "
                                                 "VAE, MFU, peak memory, classifier inference.")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", dest="mode", action="store_const", const="quick",
                       help="smaller batches and fewer rounds: under a minute on a 2-core CPU")
    speed.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                       help="tiny models and images, seconds: checks that the script runs (numbers mean nothing)")
    parser.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), help="'auto': cuda, then mps, then cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="'auto': bf16 autocast on CUDA, fp32 elsewhere (the matmul reference uses the same)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the ViTs' transformer blocks (not the VAEs), as train.py does")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--seed", type=int, help="seed of the weights and the fake data (default: 0)")
    parser.add_argument("--json-out", metavar="PATH", help="also write the final JSON object to PATH")
    parser.set_defaults(**DEFAULTS)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# The frozen VAEs, randomly initialised: real architectures, so real speed; no download.

def sd_vae_layout(seed=0):
    """AutoencoderKL in the Stable Diffusion layout (what `stabilityai/sd-vae-ft-mse` holds), random weights.

    Spelled out because diffusers' AutoencoderKL() default is a one-stage toy (block_out_channels=(64,)), not SD.
    """
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    return lmd.LatentProjection(vae, "sd-vae-layout (random weights)", trained=False)


def taesd_layout(seed=0, tiny=False):
    """AutoencoderTiny in its default (TAESD) layout, random weights; `tiny` shrinks it for --smoke."""
    from diffusers import AutoencoderTiny
    torch.manual_seed(seed)
    sizes = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                 num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4) if tiny else {}
    return lmd.LatentProjection(AutoencoderTiny(**sizes), "taesd-layout (random weights)", trained=False)


# ----------------------------------------------------------------------------------------------------------------
# Counting: FLOPs, memory, time.

def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The flop counter knows the CUDA attention kernels but not the CPU one (its FLOPs would silently count as 0).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _cpu_flash_attention_backward_flops,
}


def analytic_training_flops(size, model, batch, mask_ratio):
    """The MAE FLOPs formula, to check the counter: 2 FLOPs per multiply-add, backward twice the forward.

    Per transformer block of width d over n tokens: 24 n d^2 (qkv 6, projection 2, MLP 16) + 4 n^2 d (attention
    scores and weighted sum). The encoder sees 1 + K tokens (class token and the K visible ones), the decoder
    1 + L; plus the patch embedding (all L tokens), the decoder embedding and the head. Forward + backward = 3x.
    """
    def blocks(width, depth, n):
        return depth * (24 * n * width ** 2 + 4 * n ** 2 * width)
    (width, depth, _), (dec_width, dec_depth, _) = lmd.MODEL_SIZES[size].values()
    L, token_dim = model.num_tokens, model.patch_size ** 2 * model.channels
    K = lmd.num_visible_tokens(L, mask_ratio)
    forward = (2 * L * token_dim * width + blocks(width, depth, 1 + K) + 2 * (1 + K) * width * dec_width
               + blocks(dec_width, dec_depth, 1 + L) + 2 * (1 + L) * dec_width * token_dim)
    return 3 * forward * batch


def state_bytes(modules, optimizer=None):
    """Bytes of what lives between iterations: parameters, buffers, optimiser state (not the activations)."""
    tensors = [t for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers())]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


@contextmanager
def _quiet_fd2():
    """Silence the C++ profiler's start/stop chatter on stderr (file descriptor 2) without touching Python's."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(devnull)


def count_iteration(run, device):
    """Run one iteration counting its FLOPs and, on the CPU, its peak memory above the memory held before it.

    CUDA's allocator keeps peak statistics at no cost, so there the timed iterations give the peak instead. The CPU
    has none, so the profiler records every allocation and free of this one iteration; the peak of their running
    sum is the most the iteration added on top of what already lived (frees of older tensors are not seen, so it
    errs on the high side).
    """
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    if device.type != "cpu":
        with counter:
            run()
        synchronize(device)
        return counter.get_total_flops(), None
    from torch.profiler import ProfilerActivity, profile
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        profiler.__enter__()
    try:
        with counter:
            run()
    finally:
        with _quiet_fd2():
            profiler.__exit__(None, None, None)
    events = [e for e in profiler.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return counter.get_total_flops(), peak


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(run, device):
    """(seconds, peak bytes above the start or None) of one iteration; CUDA work is waited for on both ends."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    return seconds, peak


# ----------------------------------------------------------------------------------------------------------------
# Rows: one thing to time, e.g. "LMD training step on cached latents at the paper setting, batch 32".

@dataclass
class Row:
    key: str                 # id, used in the JSON
    group: str               # a, b, c or e, the lettering
    label: str               # what runs
    setting: str             # at which geometry
    batch: int               # images per iteration (0 for the matmul)
    run: object              # one iteration, as timed (compiled if --compile)
    run_eager: object        # the same iteration without torch.compile, for counting FLOPs
    holds: object            # -> bytes held between iterations (parameters, buffers, optimiser state)
    baseline: str = None     # key of the row its speed-up is relative to
    short: str = None        # name in other rows' speed-up column
    warmup: int = 1
    rounds: int = 1
    heavy: bool = False      # runs a VAE on 224 px images: fewer rounds
    times: list = field(default_factory=list)
    flops: float = 0.0
    peak_added: int = 0


class FakeData:
    """Stand-ins for the data train.py feeds: random images in [0, 1], and a latent cache laid out like
    the latent cache's ([N, 2 flips, C, h, w], fp16, host memory). A batch is gathered from it like train.py's."""

    def __init__(self, num_items, image_size, latent_channels, latent_grid, device, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.images = torch.rand(num_items, 3, image_size, image_size, generator=generator)
        self.latents = torch.randn(num_items, 2, latent_channels, latent_grid, latent_grid, generator=generator).half()
        self._pinned, self._next = {}, 0

    def image_batch(self, batch):
        """Images [batch, 3, S, S] on the device. On CUDA they come pinned, as from train.py's DataLoader (its
        workers gather and pin in the background): only the copy to the GPU is on the training path."""
        if self.device.type != "cuda":
            return self.images[torch.randint(len(self.images), (batch,))]
        if batch not in self._pinned:
            self._pinned[batch] = [chunk.pin_memory() for chunk in self.images.split(batch) if len(chunk) == batch]
        self._next += 1
        pinned = self._pinned[batch]
        return pinned[self._next % len(pinned)].to(self.device, non_blocking=True)

    def latent_batch(self, batch):
        """Latents [batch, C, h, w] fp32 on the device: gathered from the cache with random flips, pinned and
        copied, exactly the work TrainingBatches.latents does on the training path."""
        indices, flips = torch.randint(len(self.latents), (batch,)), torch.randint(2, (batch,))
        latents = self.latents[indices, flips]
        if self.device.type == "cuda":
            latents = latents.pin_memory()
        return latents.to(self.device, non_blocking=True).float()


class Trainer:
    """A masked autoencoder (or a relative's model: `objective`) and its optimiser, as train.py builds them."""

    def __init__(self, setting, channels, downsample, patch, device, compile_model, objective="lmd"):
        grid = datasets.check_geometry(setting["image_size"], downsample, patch)
        side = grid // patch   # tokens per side; MaskDM masks 2 x 2 blocks where they fit
        config = dict(objective=objective, model=setting["model"], patch_size=patch, block_size=2 - side % 2)
        self.model = lab.get(config.get("objective", "lmd")).build(config, grid, channels).to(device)
        self.geometry = setting
        if compile_model:   # as train.py: each transformer block, in place (the FLOP counter still sees through)
            devices.compile_transformer_blocks(self.model)
        self.compiled = self.model
        # train.py's optimiser, fused (one pass over the weights instead of a dozen) on CPU as well as CUDA.
        self.optimizer = torch.optim.AdamW(optim.parameter_groups(self.model, 0.05), lr=1.5e-4, betas=(0.9, 0.95),
                                           fused=device.type in ("cuda", "cpu"))
        # AdamW allocates its two moments at its first step. Allocate them now, with a step of size 0 on zero
        # gradients (the weights do not change), so that every measured iteration, the first one included, runs
        # with the memory a long run holds.
        for parameter in self.model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        for group in self.optimizer.param_groups:
            group["lr"], lr = 0.0, group["lr"]
        self.optimizer.step()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)


def training_row(key, group, label, setting, trainer, get_input, projection, batch, autocast, device,
                 mask_ratio=MASK_RATIO, **kw):
    """One iteration = train.py's step: take a batch, encode it if it is images, forward, backward, AdamW."""
    # The masks come from a generator, as in train.py (torch.compile with dynamic shapes also fails on
    # torch.rand(..., generator=None) in lmd.random_masking, so passing one matters there).
    generator = torch.Generator(device=device).manual_seed(0)

    def make(model):
        def run():
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                latents = get_input(batch)
                if projection is not None:          # images -> latents every step, as train.py --no-cache
                    latents = vaes.encode_images(projection, latents, autocast)
                loss, _, _ = model(latents, mask_ratio, generator=generator)
            loss.backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)  # here, so no gradient outlives the iteration
        return run
    return Row(key, group, label, setting, batch, make(trainer.compiled), make(trainer.model),
               lambda: state_bytes([trainer.model, projection], trainer.optimizer), **kw)


def inference_row(key, group, label, setting, classifier, compiled, get_input, projection, batch, autocast, device,
                  **kw):
    """One iteration = classify a batch of images: VAE encode (if any), encoder on all tokens, pool, head."""
    def make(model):
        @torch.inference_mode()
        def run():
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                inputs = get_input(batch)
                return model(vaes.encode_images(projection, inputs, autocast) if projection is not None else inputs)
        return run
    return Row(key, group, label, setting, batch, make(compiled), make(classifier),
               lambda: state_bytes([classifier, projection]), **kw)


def matmul_row(key, timed_with, size, dtype, device):
    """The MFU reference: dense size x size @ size x size matmuls (2 size^3 FLOPs each), timed in a group's rounds.

    A GPU does one in a millisecond or two, so there an iteration is ten of them, for a less noisy timing.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    repeats = 1 if device.type == "cpu" else 10

    def run():
        for _ in range(repeats):
            torch.mm(a, b)
    name = str(dtype).replace("torch.", "")
    return Row(key, "c", f"dense matmul {size}x{size} {name}", f"MFU reference of {timed_with}", 0, run, run,
               lambda: 3 * a.numel() * a.element_size())


def measure(rows, plan, device, bar=None):
    """Warm up each row, count one iteration, then time all rows in interleaved rounds."""
    for row in rows:
        row.rounds = plan["vae_rounds"] if row.heavy else plan["rounds"]
        for _ in range(row.warmup):
            row.run()
            _advance(bar, row)
        synchronize(device)
        row.flops, row.peak_added = count_iteration(row.run_eager, device)
        _advance(bar, row)
    for round_index in range(max(row.rounds for row in rows)):
        for row in rows:
            if round_index < row.rounds:
                seconds, peak = timed(row.run, device)
                row.times.append(seconds)
                if peak is not None:
                    row.peak_added = max(row.peak_added or 0, peak)
                _advance(bar, row)
    return rows


def _advance(bar, row):
    if bar is not None:
        bar.set_postfix_str(row.key)
        bar.update(1)


# ----------------------------------------------------------------------------------------------------------------
# Results.

def summarise(rows):
    """Per row of one group: images/s, speed-up over its baseline, GFLOP per image, TFLOP/s, MFU, peak MiB.

    MFU = the row's counted FLOPs per second / the FLOPs per second of the group's matmul, timed in the same rounds.
    """
    reference = next((row for row in rows if row.group == "c"), None)
    by_key = {row.key: row for row in rows}
    results = {}
    for row in rows:
        seconds = statistics.median(row.times)
        result = dict(group=row.group, label=row.label, setting=row.setting, batch=row.batch,
                      seconds_median=seconds, seconds_all=[round(t, 4) for t in row.times],
                      tflops=row.flops / seconds / 1e12, peak_mib=(row.holds() + (row.peak_added or 0)) / 2 ** 20)
        if row.batch:
            result.update(images_per_second=row.batch / seconds, gflops_per_image=row.flops / row.batch / 1e9)
        if reference is not None and reference is not row:
            result["mfu"] = (row.flops / seconds) / (reference.flops / statistics.median(reference.times))
        results[row.key] = result
    for row in rows:
        if row.baseline:
            baseline = results[by_key[row.baseline].key]
            results[row.key]["speedup"] = results[row.key]["images_per_second"] / baseline["images_per_second"]
            results[row.key]["speedup_over"] = by_key[row.baseline].short or row.baseline
    return results


def print_table(results, header):
    """One line per row, grouped a, b, c, e. The matmul rows show GFLOP/s where the others show images/s."""
    print(header)
    columns = "{:<1}  {:<42} {:<33} {:>5} {:>10}  {:<27} {:>8} {:>9} {:>5}"
    print(columns.format("", "measurement", "setting", "batch", "images/s", "speed-up", "peak MiB", "GFLOP/img",
                         "MFU*"))
    for r in sorted(results.values(), key=lambda r: r["group"]):   # stable: groups in order, rows as measured
        speedup = f"{r['speedup']:.2f}x vs {r['speedup_over']}" if "speedup" in r else ""
        speed = f"{r['images_per_second']:.2f}" if r["batch"] else f"{r['tflops'] * 1e3:.0f} GF/s"
        gflops = f"{r['gflops_per_image']:.2f}" if r["batch"] else ""
        mfu = f"{r['mfu']:.2f}" if "mfu" in r else ""
        print(columns.format(r["group"], r["label"], r["setting"], r["batch"] or "", speed, speedup,
                             f"{r['peak_mib']:,.0f}", gflops, mfu))
    print("* MFU: model FLOP/s over the FLOP/s of the group's measured dense matmul (c) in the same dtype, on this "
          "device; not over the datasheet peak")


def nominal_peak_tflops(name, dtype):
    """The datasheet's dense bf16 TFLOP/s of the GPU called `name`, or None (not bf16, or not in the table)."""
    if dtype != torch.bfloat16:
        return None
    return next((tflops for part, tflops in NOMINAL_BF16_TFLOPS if part in name), None)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    device = devices.select_device(args.device)
    threads_before = torch.get_num_threads()
    # --smoke runs on one thread: tiny ops gain nothing from two, and a busy machine stalls their barriers.
    torch.set_num_threads(args.threads or (1 if args.mode == "smoke" else threads_before))
    try:
        run_benchmark(args, device, started, load_before)
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (the tests do)


def run_benchmark(args, device, started, load_before):
    """Build, measure and report every group; prints the table and, last, the JSON line."""
    from tqdm import tqdm
    if device.type == "cuda":  # as train.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = devices.autocast_dtype(args.precision, device)
    dtype = autocast or torch.float32          # of the MFU reference matmul: what the step's matmuls run in
    plan = PLANS[(args.mode, "cpu" if device.type == "cpu" else "gpu")]
    smoke = args.mode == "smoke"
    paper, small = (SMOKE, SMOKE) if smoke else (PAPER, CPU_SIZED)
    torch.manual_seed(args.seed)
    results = {}

    def run_group(rows, description):
        if args.compile:  # the first calls compile, and a new batch size recompiles: never time or count those
            for row in rows:
                row.warmup = max(row.warmup, 2)
        total = sum(row.warmup + 1 + (plan["vae_rounds"] if row.heavy else plan["rounds"]) for row in rows)
        with tqdm(total=total, desc=description, unit="it", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
            measure(rows, plan, device, bar)
        results.update(summarise(rows))
        print(f"{description}: measured ({time.time() - started:.0f} s)", file=sys.stderr)

    def setting(geometry, latent):
        patch = geometry["latent_patch"] if latent else geometry["pixel_patch"]
        space = "latent" if latent else "pixel"
        return f"{geometry['name']}: {geometry['model']} {geometry['image_size']}px {space} p{patch}"

    def train(key, group, label, trainer, inputs, projection, batch, latent, **kw):
        return training_row(key, group, label, setting(trainer.geometry, latent), trainer, inputs, projection, batch,
                            autocast, device, **kw)

    pixels = lmd.LatentProjection()  # the pixel MAE's "VAE": [0, 1] -> [-1, 1], nothing else
    size = paper["image_size"]
    data = FakeData(STORE_BATCHES * max(plan["train"], plan["infer"]), size, 4, size // 8, device, args.seed)

    # a. LMD on cached latents against the pixel MAE at the paper's setting, same batch.
    lmd_paper = Trainer(paper, 4, 8, paper["latent_patch"], device, args.compile)
    pixel_paper = Trainer(paper, 3, 1, paper["pixel_patch"], device, args.compile)
    rows = [train("lmd_paper", "a", "LMD pretraining, cached latents", lmd_paper, data.latent_batch, None,
                  plan["train"], True, baseline="pixel_mae_paper", warmup=plan["warmup"]),
            train("pixel_mae_paper", "a", "pixel MAE pretraining (--vae none)", pixel_paper, data.image_batch, pixels,
                  plan["train"], False, warmup=plan["warmup"], short="pixel MAE"),
            matmul_row("matmul_paper", "a, paper", plan["matmul"], dtype, device)]
    run_group(rows, f"a. {paper['name']} setting")
    flop_check = rows[0].flops / analytic_training_flops(paper["model"], lmd_paper.model, plan["train"], MASK_RATIO)
    del pixel_paper, rows
    _free(device)

    # b. The same LMD model with the VAE encoding every batch, against cached latents, at the training batch.
    sd = (lmd.LatentProjection(vaes.tiny_vae(), "tiny", trained=False) if smoke else sd_vae_layout(args.seed)).to(device)
    taesd = taesd_layout(args.seed, tiny=smoke).to(device)
    heavy = not smoke
    rows = [train("lmd_cached", "b", "LMD pretraining, cached latents", lmd_paper, data.latent_batch, None,
                  plan["cache"], True, baseline="lmd_sd_vae_every_step", warmup=0),
            train("lmd_sd_vae_every_step", "b", "LMD pretraining, SD VAE encode every step", lmd_paper,
                  data.image_batch, sd, plan["cache"], True, warmup=0, heavy=heavy, short="SD VAE every step"),
            train("lmd_taesd_every_step", "b", "LMD pretraining, TAESD encode every step", lmd_paper,
                  data.image_batch, taesd, plan["cache"], True, baseline="lmd_sd_vae_every_step", warmup=0,
                  heavy=heavy),
            matmul_row("matmul_vae", "b", plan["matmul"], dtype, device)]
    run_group(rows, "b. cached latents vs VAE every step")
    del lmd_paper, rows
    _free(device)

    # a. The same comparison at the CPU-sized setting.
    size = small["image_size"]
    small_data = FakeData(STORE_BATCHES * plan["small"], size, 4, size // 8, device, args.seed)
    lmd_small = Trainer(small, 4, 8, small["latent_patch"], device, args.compile)
    pixel_small = Trainer(small, 3, 1, small["pixel_patch"], device, args.compile)
    rows = [train("lmd_cpu_sized", "a", "LMD pretraining, cached latents", lmd_small, small_data.latent_batch, None,
                  plan["small"], True, baseline="pixel_mae_cpu_sized", warmup=plan["warmup"]),
            train("pixel_mae_cpu_sized", "a", "pixel MAE pretraining (--vae none)", pixel_small,
                  small_data.image_batch, pixels, plan["small"], False, warmup=plan["warmup"], short="pixel MAE"),
            matmul_row("matmul_cpu_sized", f"a, {small['name']}", plan["matmul"], dtype, device)]
    run_group(rows, f"a. {small['name']} setting")
    del pixel_small, rows

    # f. Each objective's training step beside LMD's: the same model and cached latents (CPU-sized setting).
    objectives = dict(ddpm=("ddpm training (no mask, eps)", 0.0), maskdm=("MaskDM stage 1 (0.75 in blocks)", 0.75))
    rows = [train("objective_lmd", "f", "LMD pretraining (mask 0.75)", lmd_small, small_data.latent_batch, None,
                  plan["small"], True, warmup=plan["warmup"], short="LMD")]
    for objective, (label, ratio) in objectives.items():
        trainer = Trainer(small, 4, 8, small["latent_patch"], device, args.compile, objective)
        rows.append(train(f"objective_{objective}", "f", label, trainer, small_data.latent_batch, None,
                          plan["small"], True, mask_ratio=ratio, baseline="objective_lmd", warmup=plan["warmup"]))
    rows.append(matmul_row("matmul_objectives", "f", plan["matmul"], dtype, device))
    run_group(rows, "f. each objective's training step")
    del lmd_small, small_data, rows
    _free(device)

    # e. Classifier inference on 224 px images: latent ViT-B/4 with its VAE encoder against a pixel ViT-B/16.
    def classifier(channels, downsample, patch):
        grid = datasets.check_geometry(paper["image_size"], downsample, patch)
        model = lmd.LatentClassifier(lmd.MaskedLatentViT(paper["model"], grid, patch, channels), 1000).to(device)
        return model.eval(), (devices.compile_transformer_blocks(model) if args.compile else model)

    def classify(key, label, model, inputs, projection, batch, latent, **kw):
        return inference_row(key, "e", label, setting(paper, latent), *model, inputs, projection, batch, autocast,
                             device, **kw)

    latent_classifier = classifier(4, 8, paper["latent_patch"])
    pixel_classifier = classifier(3, 1, paper["pixel_patch"])
    rows = [classify("classify_sd_vae", "latent ViT classifier, SD VAE encode", latent_classifier, data.image_batch,
                     sd, plan["vae"], True, baseline="classify_pixel", warmup=0, heavy=heavy),
            classify("classify_taesd", "latent ViT classifier, TAESD encode", latent_classifier, data.image_batch,
                     taesd, plan["vae"], True, baseline="classify_pixel", warmup=0, heavy=heavy),
            classify("classify_latents", "latent ViT classifier, latents given", latent_classifier,
                     data.latent_batch, None, plan["infer"], True, baseline="classify_pixel", warmup=plan["warmup"]),
            classify("classify_pixel", "pixel ViT classifier", pixel_classifier, data.image_batch, pixels,
                     plan["infer"], False, warmup=plan["warmup"], short="pixel ViT"),
            matmul_row("matmul_inference", "e", plan["matmul"], dtype, device)]
    run_group(rows, "e. classifier inference")
    del rows, sd, taesd, latent_classifier, pixel_classifier, data
    _free(device)
    report(results, args, device, dtype, flop_check, started, load_before)


def report(results, args, device, dtype, flop_check, started, load_before):
    """Print the table, the headline figures against the targets, and the JSON line (last)."""
    threads, cores, load_after = torch.get_num_threads(), os.cpu_count(), os.getloadavg()
    lmd_row, pixel_row = results["lmd_paper"], results["pixel_mae_paper"]
    summary = dict(
        speedup_vs_pixel_mae=lmd_row["speedup"],
        cache_speedup=results["lmd_cached"]["speedup"],
        mfu=lmd_row["mfu"],
        device=device.type,
        device_name=device_name(device),
        torch=torch.__version__,
        threads=threads,
        precision=str(dtype).replace("torch.", ""),
        compile=args.compile,
        mode=args.mode,
        speedup_vs_pixel_mae_cpu_sized=results["lmd_cpu_sized"]["speedup"],
        cache_speedup_taesd=results["lmd_cached"]["images_per_second"]
        / results["lmd_taesd_every_step"]["images_per_second"],
        mfu_pixel_mae=pixel_row["mfu"],
        lmd_images_per_second=lmd_row["images_per_second"],
        pixel_mae_images_per_second=pixel_row["images_per_second"],
        peak_memory_mib=dict(lmd=lmd_row["peak_mib"], pixel_mae=pixel_row["peak_mib"]),
        objective_images_per_second={name: results[f"objective_{name}"]["images_per_second"]
                                     for name in ("lmd", "ddpm", "maskdm")},
        inference_speedup_sd_vae=results["classify_sd_vae"]["speedup"],
        inference_speedup_taesd=results["classify_taesd"]["speedup"],
        matmul_tflops=results["matmul_paper"]["tflops"],
        mfu_basis=f"a measured dense {str(dtype).replace('torch.', '')} matmul on this device",
        flop_count_vs_formula=flop_check,
        load_average=dict(before=round(load_before[0], 2), after=round(load_after[0], 2), cores=cores),
        seconds=time.time() - started,
    )
    peak = nominal_peak_tflops(summary["device_name"], dtype)
    summary.update(nominal_peak_tflops=peak, mfu_vs_nominal_peak=lmd_row["tflops"] / peak if peak else None)
    summary["targets"] = {name: dict(target=target, measured=summary[name], met=summary[name] >= target)
                          for name, target in TARGETS.items()}
    summary["rows"] = results
    print_table(results, f"LMD benchmark ({args.mode}): {device.type} ({summary['device_name']}, {threads} "
                         f"thread{'s' if threads > 1 else ''}), "
                         f"torch {torch.__version__}, {summary['precision']}, "
                         f"{'torch.compile' if args.compile else 'eager'}, mask ratio {MASK_RATIO}, "
                         f"{summary['seconds']:.0f} s")
    setting = "smoke setting (tiny models: these numbers mean nothing)" if args.mode == "smoke" else "paper setting"
    nominal = (f"{summary['mfu_vs_nominal_peak']:.2f} of the nominal {peak} TFLOP/s" if peak else
               "unknown against the nominal peak (device not in NOMINAL_BF16_TFLOPS, or not bf16)")
    print(f"\nLMD vs pixel MAE, {setting}: {summary['speedup_vs_pixel_mae']:.2f}x; cached latents vs SD VAE "
          f"every step: {summary['cache_speedup']:.1f}x; MFU of the LMD step: {summary['mfu']:.2f} of "
          f"{summary['mfu_basis']}, {nominal} (counted FLOPs / formula: {flop_check:.3f})")
    steps = summary["objective_images_per_second"]
    print(f"training steps of each objective ({small_setting_name(args)}): LMD {steps['lmd']:.1f} images/s, ddpm "
          f"{steps['ddpm']:.1f} ({steps['ddpm'] / steps['lmd']:.2f}x), MaskDM stage 1 {steps['maskdm']:.1f} "
          f"({steps['maskdm'] / steps['lmd']:.2f}x)")
    for name, target in summary["targets"].items():
        print(f"  {name} >= {target['target']}: {'met' if target['met'] else 'NOT met'} ({target['measured']:.2f})")
    if device.type == "cpu" and max(load_before[0], load_after[0]) > 1.25 * cores:
        advice = "; --threads 1 keeps threads from stalling on each other" if threads > 1 else ""
        print(f"  note: the machine was busy (load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {cores} "
              f"cores): absolute speeds are low; ratios of rows timed in the same rounds hold up better{advice}")
    if args.json_out:
        with open(args.json_out, "w") as file:
            json.dump(summary, file, indent=2)
    print(json.dumps(summary))


def small_setting_name(args):
    return (SMOKE if args.mode == "smoke" else CPU_SIZED)["name"] + " setting"


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    cli.run_cli(main)
