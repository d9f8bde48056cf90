"""Running on a cluster: the sharded, resumable latent cache under torchrun, rank 0 first for downloads, ranks that
agree on a non-finite loss, resuming on fewer GPUs, signals from SLURM and torchrun, per-epoch data order, and the
device, precision and worker choices (the GPU ones faked with monkeypatch)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import finetune
import lmd
from util import checkpoints
from util import datasets
from util import devices
from util import latent_cache
from util import pretraining
from util import sampling
import train
from support import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
PIXEL_CACHE = dict(dataset="synthetic", image_size=16, vae="none", synthetic_size=64, num_workers=0)
LINPROBE = ["--mode", "linprobe", "--epochs", "5", "--num-workers", "0", "--device", "cpu"]   # in the job and beside it


def torchrun(script, tmp_path, timeout=120):
    (tmp_path / "script.py").write_text(script)
    return subprocess.run([*TORCHRUN, str(tmp_path / "script.py")], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def expected_pixel_latents():
    """What a cache of PIXEL_CACHE must hold: with no VAE the 'latents' are the images in [-1, 1], and mirrored."""
    images = datasets.ImageDataset(datasets.SyntheticShapes("train", 16, 64), 16)
    pixels = torch.stack([images[i][0] for i in range(len(images))]) * 2 - 1
    return torch.stack([pixels, pixels.flip(-1)], dim=1).half()


def counting_projection(calls):
    """The pixel 'VAE', counting the images it encodes."""
    projection = lmd.LatentProjection()
    encode = projection.encode
    projection.encode = lambda images: calls.append(len(images)) or encode(images)
    return projection


def test_only_rank_0_looks_at_the_images_of_a_complete_cache(tmp_path, monkeypatch, capsys):
    config, dist = dict(PIXEL_CACHE, data_dir=str(tmp_path)), devices.Distributed("cpu")
    latent_cache.dataset_latents(config, "train", lmd.LatentProjection(), dist)

    def no_images(*args, **kwargs):
        raise AssertionError("the images were loaded")
    monkeypatch.setattr(latent_cache, "load_image_source", no_images)
    dist.rank, calls = 1, []                    # another rank: it takes rank 0's word and never lists the images
    cache = latent_cache.dataset_latents(config, "train", counting_projection(calls), dist)
    assert calls == [] and len(cache["labels"]) == 64 and cache["latents"].dtype == torch.float16
    assert cache["classes"] == list(datasets.SYNTHETIC_CLASSES)
    # rank 0 checks the images: other ones (here, fewer) mean a rebuild
    fewer = torch.utils.data.Subset(datasets.SyntheticShapes("train", 16, 64), range(60))
    fewer.classes = list(datasets.SYNTHETIC_CLASSES)
    dist.rank = 0
    rebuilt = latent_cache.dataset_latents(config, "train", lmd.LatentProjection(), dist, fewer)
    assert "made with other settings (count: 64 != 60" in capsys.readouterr().err and len(rebuilt["labels"]) == 60


# One torchrun job (a torchrun start costs three torch imports): rank 0 first, its failure reaching rank 1, flags
# agreed on, train.py with a NaN loss on rank 1 only, a stop signal to rank 1 only, finetune.py's linear probe; then a
# sharded cache build of 16 chunks of 4 images in which rank 1 is killed in its second chunk, which ends the job.
JOB = """
import os, runpy, signal, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, os.path.join({root!r}, "tests"))
import torch
import lmd
import train
from support import tiny_flags
from util import cli, devices, latent_cache, pretraining
dist = devices.Distributed("cpu")
torch.distributed.destroy_process_group = lambda: None   # one process group for the whole job
out = {out!r}
def say(line):    # each rank its own file: lines of two processes on one pipe can interleave
    with open(os.path.join(out, f"rank{{dist.rank}}.txt"), "a") as file:
        file.write(line + "\\n")
marker = os.path.join(out, "downloaded")
def download():
    if dist.is_main:
        time.sleep(1)
        open(marker, "w").close()
    return os.path.exists(marker)
say(f"saw the download: {{dist.main_first(download)}}")
try:
    dist.main_first(lambda: 1 / 0)
except Exception as error:
    say(f"main_first failed: {{type(error).__name__}}")
say(f"agreed: {{dist.any_each(dist.rank == 1, False, torch.tensor(dist.rank == 0))}}")
latents = pretraining.TrainingBatches.latents
def nan_on_rank_1(self, step):
    return latents(self, step) * (float("nan") if dist.rank == 1 and step == 2 else 1.0)
pretraining.TrainingBatches.latents = nan_on_rank_1
devices.Distributed = lambda device: dist
try:   # the ranks compare notes at steps 2, 4, 6: the NaN of step 3 is found at 4, on both
    train.main(tiny_flags({data!r}, os.path.join(out, "run"), steps=6, log_every=2, save_every=2))
except cli.UserError as error:
    say(f"stopped: {{error}}")
# rank 1 alone is signalled, after step 1; the ranks agree at step 4 (--log-every 4): one all-reduce, not one a step
agreements, any_each = [], dist.any_each
dist.any_each = lambda *flags: agreements.append(len(flags)) or any_each(*flags)
def signal_rank_1(self, step):
    if dist.rank == 1 and step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return latents(self, step)
pretraining.TrainingBatches.latents = signal_rank_1
stopped_at, train_loop = [], train.train_loop
train.train_loop = lambda *args: stopped_at.append(train_loop(*args)) or stopped_at[-1]
train.main(tiny_flags({data!r}, os.path.join(out, "stop"), steps=9, log_every=4, save_every=100))
say(f"stop: step {{stopped_at}}, {{agreements.count(2)}} all-reduce")
torch.distributed.barrier()   # rank 0 has saved that run, as it would have before a new job starts
# finetune.py, as a script, probes that run: the ranks split the feature extraction and gather it
sys.argv = ["finetune.py", "--checkpoint", os.path.join(out, "stop"), "--out", os.path.join(out, "linprobe"),
            *{linprobe!r}]
runpy.run_path(os.path.join({root!r}, "finetune.py"), run_name="__main__")
say("building the cache")
latent_cache.CHUNK, latent_cache.ENCODE_BATCH = 4, 2
projection, calls = lmd.LatentProjection(), []
encode = projection.encode
def encode_then_die(images):
    calls.append(1)
    if dist.rank == 1 and len(calls) == 7:    # two encodes (both flips) a batch: in its 4th batch, 2nd chunk
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(images)
projection.encode = encode_then_die
latent_cache.dataset_latents(dict({config!r}, data_dir=os.path.join(out, "killed")), "train", projection, dist)
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory, data_dir):
    """The torchrun job above -> (its completed process, its directory)."""
    out = tmp_path_factory.mktemp("torchrun")
    return torchrun(JOB.format(root=ROOT, out=str(out), data=data_dir, config=PIXEL_CACHE, linprobe=LINPROBE), out), out


def test_torchrun_ranks_download_in_turn_agree_on_a_non_finite_loss_and_a_stop_and_one_process_resumes(job):
    result, tmp_path = job
    said = [(tmp_path / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert said[0][5:] == said[1][5:] == ["building the cache"], result.stderr[-3000:]   # both got that far
    # rank 0 alone speaks: one announcement for each of the two runs
    assert result.stderr.count("LMD: tiny model") == 2 and "2 process(es)" in result.stderr
    for lines in said:
        assert lines[0] == "saw the download: True"                          # rank 1 ran after rank 0 finished
        assert lines[2] == "agreed: [True, False, True]"
    assert said[0][1] == "main_first failed: ZeroDivisionError" and said[1][1] == "main_first failed: UserError"
    assert said[0][3] == said[1][3]                                          # both ranks stop with the same message
    assert said[0][3].startswith("stopped: the loss became non-finite in a process in steps 3-4;")
    assert checkpoints.load_checkpoint(str(tmp_path / "run"))["step"] == 2  # the last good weights
    assert said[0][4] == said[1][4] == "stop: step [4], 1 all-reduce"     # both stopped at the agreed step
    assert checkpoints.load_checkpoint(str(tmp_path / "stop"))["step"] == 4
    train.main(["--resume", str(tmp_path / "run")])                          # two processes' run, resumed on one
    assert checkpoints.load_checkpoint(str(tmp_path / "run"))["step"] == 6


def test_finetune_under_torchrun_gets_the_single_process_linear_probe(job):
    """finetune.py's linear probe in the job: its two processes split the feature extraction, gather it, and get the
    probe of one process."""
    result, tmp_path = job
    assert (tmp_path / "linprobe" / "results.json").exists(), result.stderr[-3000:]
    two = json.loads((tmp_path / "linprobe" / "results.json").read_text())
    finetune.main(["--checkpoint", str(tmp_path / "stop"), "--out", str(tmp_path / "linprobe-one"), *LINPROBE])
    one = json.loads((tmp_path / "linprobe-one" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1 and len(two["history"]) == 5
    for history in ("history", "random_init_history", "raw_pixels_history"):
        assert [epoch["top1"] for epoch in two[history]] == pytest.approx([epoch["top1"] for epoch in one[history]],
                                                                          abs=0.01), history


def test_sharded_cache_build_killed_under_torchrun_resumes_where_it_stopped(job, monkeypatch, capsys):
    result, out = job
    data = str(out / "killed")
    assert result.returncode != 0                                        # the job died with rank 1
    path = latent_cache.cache_file(data, "synthetic", "train", "none", 16, 64)
    assert not os.path.exists(path)                                      # no index: the cache is not complete
    done = (out / "killed" / "lmd_latents" / "synthetic-train64-none-16px.parts" / "done.u8").read_bytes()
    assert len(done) == 16 and done[1] == 1 and 1 <= sum(done) < 16     # rank 1 finished its first chunk (1)
    # Restarted as one process, it encodes only the chunks that were not done, and the whole cache is right.
    monkeypatch.setattr(latent_cache, "CHUNK", 4)
    monkeypatch.setattr(latent_cache, "ENCODE_BATCH", 2)
    calls = []
    cache = latent_cache.dataset_latents(dict(PIXEL_CACHE, data_dir=data), "train", counting_projection(calls),
                                         devices.Distributed("cpu"))
    assert f"{sum(done)} of 16 chunks were done" in capsys.readouterr().err
    assert sum(calls) == 2 * 4 * (16 - sum(done))                      # both flips of the missing chunks' images
    assert torch.equal(cache["latents"], expected_pixel_latents())
    assert cache["labels"].tolist() == [i % 10 for i in range(64)] and os.path.exists(path)


def test_resuming_a_checkpoint_of_eight_gpus_restores_the_saver_state_on_one(monkeypatch):
    """A checkpoint from rank 0 of an 8-GPU node holds get_rng_state_all(): 8 states. On one GPU only its own
    (the first) is restored, where set_rng_state_all raised IndexError."""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    assert torch.equal(checkpoints.saved_cuda_rng_state(states), states[0])
    assert checkpoints.saved_cuda_rng_state(states[3]) is states[3] and checkpoints.saved_cuda_rng_state(None) is None
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    cpu_state = torch.get_rng_state()
    checkpoints.restore_rng_state(dict(cpu=cpu_state, cuda=states), torch.device("cuda", 0))
    assert len(restored) == 1 and torch.equal(restored[0][0], states[0]) and restored[0][1] == torch.device("cuda", 0)
    checkpoints.restore_rng_state(dict(cpu=cpu_state, cuda=states), torch.device("cpu"))
    assert len(restored) == 1                                                # no GPU, no CUDA state


def test_sigterms_only_request_the_save_and_a_second_ctrl_c_aborts():
    """SLURM and torchrun deliver two SIGTERMs to each process: neither may abort the save. Only the user's second
    Ctrl-C does. Afterwards the previous handlers are back."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pretraining.StopRequest() as stop:
        for number in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), number)
            time.sleep(0.05)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_data_order_is_computed_once_per_epoch_and_unchanged():
    sampling.epoch_permutation.cache_clear()
    steps_per_epoch = 1000 // 10
    first_epoch = [sampling.batch_indices(step, 1000, 10, seed=3) for step in range(steps_per_epoch)]
    assert sampling.epoch_permutation.cache_info().misses == 1               # one randperm for the whole epoch
    reference = torch.randperm(1000, generator=torch.Generator().manual_seed(3 * 100_003))   # as before the cache
    assert torch.equal(torch.cat(first_epoch), reference)
    first_epoch[0][:] = -1                                                   # a caller writing into its batch ...
    assert torch.equal(sampling.batch_indices(0, 1000, 10, seed=3), reference[:10])   # ... leaves the order intact
    sampling.batch_indices(steps_per_epoch, 1000, 10, seed=3)
    assert sampling.epoch_permutation.cache_info().misses == 2               # the next epoch: a new permutation


def test_auto_precision_takes_bf16_only_where_the_gpu_has_it(monkeypatch):
    """V100s and T4s run bf16 by emulation, which is_bf16_supported() counts by default: they get fp32."""
    cuda = torch.device("cuda")
    for native, expected in ((False, None), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
                            or native)
        assert devices.autocast_dtype("auto", cuda) == expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(devices.UserError, match="no native bf16"):
        devices.autocast_dtype("bf16", cuda)


def test_loader_workers_share_the_node_cores_among_its_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert devices.loader_workers() == 1                                    # 16 cores / 8 processes - 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert devices.loader_workers() == 8 and devices.loader_workers(3) == 3


def test_each_task_with_one_visible_gpu_uses_it(monkeypatch):
    """A scheduler that gives each task one GPU: LOCAL_RANK 5 must use cuda:0, the only device it sees."""
    chosen = []
    for name, value in dict(WORLD_SIZE="8", RANK="5", LOCAL_RANK="5", LMD_TIMEOUT_MINUTES="90").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: chosen.append(timeout))
    dist = devices.Distributed("cuda")
    assert dist.device == torch.device("cuda", 0) and chosen[0] == dist.device
    assert chosen[1].total_seconds() == 90 * 60                             # the process-group timeout
