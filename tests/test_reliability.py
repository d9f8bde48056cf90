"""Nothing is lost: exact resume, atomic checkpoints, signals, non-finite losses, odd images (torchrun: see
test_cluster.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from util import checkpoints
from util import cli
from util import datasets
import train
from support import ROOT, tiny_flags


def weights(run_dir):
    return checkpoints.load_checkpoint(str(run_dir))["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_stop_and_resume_gives_bit_identical_weights(tmp_path, data_dir):
    """8 steps in one go == 4 steps, stop, resume to 8: model, optimiser, lr and mask schedule, data, masks. With
    a grid and a held-out evaluation at steps 4 and 8, which must leave every random stream of the run as it was."""
    train.main(tiny_flags(data_dir, str(tmp_path / "straight"), steps=8, save_every=100, grid_every=4))
    train.main(tiny_flags(data_dir, str(tmp_path / "split"), steps=8, save_every=100, grid_every=4,
                          stop_after_step=4))
    assert checkpoints.load_checkpoint(str(tmp_path / "split"))["step"] == 4
    train.main(["--resume", str(tmp_path / "split")])
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"))
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    split = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(line).items() if k != "images_per_second"} for line in lines]  # noqa: E731
    assert strip(straight) == strip(split)          # the same losses, mask ratios and learning rates at every step
    assert [json.loads(line)["step"] for line in split if "held_out_loss" in line] == [4, 8]   # and the same values


def test_resume_refuses_a_changed_setting(tmp_path, data_dir, capsys):
    train.main(tiny_flags(data_dir, str(tmp_path / "run"), steps=4, stop_after_step=2))
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: train.main(["--resume", str(tmp_path / "run"), "--scheduler", "linear"]))
    assert exit_info.value.code == 2 and "differs from the resumed run" in capsys.readouterr().err


# train.py that, after logging step 2, waits for a stop request: the signal then surely arrives mid-run.
WAIT_FOR_A_SIGNAL_AT_STEP_2 = """
import sys, time
sys.path.insert(0, {root!r})
from util import cli, pretraining
import train
append, enter, requests = pretraining.append_metrics, pretraining.StopRequest.__enter__, []
def append_then_wait(path, record):
    append(path, record)
    if record["step"] == 2:
        print("step 2", flush=True)
        deadline = time.time() + 60
        while not requests[0].requested and time.time() < deadline:
            time.sleep(0.01)
pretraining.append_metrics = append_then_wait
pretraining.StopRequest.__enter__ = lambda self: requests.append(enter(self)) or requests[-1]
cli.run_cli(lambda: train.main({argv!r}))
"""


def group_alive(group):
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def group_members(group):
    """The ids of the live processes in process group `group` (from /proc: Linux)."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()   # after the command name, which may hold spaces
        except OSError:   # gone meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(pid))
    return members


def end_within_30_s(process):
    """-> stderr of `process` (started in its own session) once it and every process of its group are gone; fails,
    after killing the group, if any is alive 30 s after the call."""
    deadline = time.time() + 30
    try:
        _, err = process.communicate(timeout=30)
        while group_alive(process.pid) and time.time() < deadline:
            time.sleep(0.1)
    except subprocess.TimeoutExpired:
        err = "(still running)"
    if group_alive(process.pid) or process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)
        pytest.fail(f"a process of the run is alive 30 s after the signal: {err[-1000:]}")
    return err


@pytest.mark.parametrize("signal_name, to_group, workers", [("SIGINT", False, 2), ("SIGTERM", False, 1),
                                                            ("SIGTERM", True, 2)])
def test_a_stop_signal_saves_and_ends_every_process(tmp_path, signal_name, to_group, workers):
    """Ctrl-C (SIGINT to the training process), a kill (SIGTERM to it alone) and SLURM (SIGTERM to every process of
    the job, the loader workers too): a checkpoint at the end of the step, then every process gone. The run is
    long, so its loader is mid-epoch: its workers (which ignore the signals, so that the training process can
    save) are still running when the process exits, and must not keep it waiting."""
    make_image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    run_flags = lambda out, workers: tiny_flags(  # noqa: E731
        str(tmp_path / "data"), str(out), dataset="imagefolder", image_size=32, steps=1000, batch_size=8,
        save_every=1000, num_workers=workers, vae="none") + ["--no-cache"]
    argv = run_flags(out, workers)
    process = subprocess.Popen([sys.executable, "-c", WAIT_FOR_A_SIGNAL_AT_STEP_2.format(root=ROOT, argv=argv)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)   # its own process group: the test runner is not signalled
    assert process.stdout.readline().strip() == "step 2", end_within_30_s(process)[-2000:]
    number = getattr(signal, signal_name)
    os.killpg(process.pid, number) if to_group else process.send_signal(number)
    err = end_within_30_s(process)
    assert process.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "continue with: python train.py --resume" in err
    assert checkpoints.load_checkpoint(str(out))["step"] == 3    # the step under way when the signal came
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    if signal_name == "SIGINT":   # the saved state is exactly that of a run told to stop after that step
        train.main(run_flags(tmp_path / "reference", 0) + ["--stop-after-step", "3"])
        assert_same_weights(weights(out), weights(tmp_path / "reference"))
    if to_group:   # and the run continues from there
        train.main(["--resume", str(out), "--num-workers", "0", "--stop-after-step", "5"])
        assert checkpoints.load_checkpoint(str(out))["step"] == 5


def test_a_second_ctrl_c_while_saving_aborts_with_one_line(tmp_path):
    """Ctrl-C, then Ctrl-C again while the checkpoint is written: 'interrupted', exit status 130, no traceback, and
    every process (two loader workers) gone."""
    make_image_folder(tmp_path / "data", per_class=8)
    argv = tiny_flags(str(tmp_path / "data"), str(tmp_path / "run"), dataset="imagefolder", image_size=32,
                      steps=1000, batch_size=8, save_every=1000, num_workers=2, vae="none") + ["--no-cache"]
    harness = WAIT_FOR_A_SIGNAL_AT_STEP_2.replace("cli.run_cli(", SAVE_SLOWLY + "cli.run_cli(")
    process = subprocess.Popen([sys.executable, "-c", harness.format(root=ROOT, argv=argv)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout.readline().strip() == "step 2", end_within_30_s(process)[-2000:]
    process.send_signal(signal.SIGINT)
    assert process.stdout.readline().strip() == "saving", end_within_30_s(process)[-2000:]
    process.send_signal(signal.SIGINT)
    err = end_within_30_s(process)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted"


# Saving that takes a minute: a second signal surely arrives while the checkpoint is written.
SAVE_SLOWLY = """
from util import checkpoints
def announce_then_wait(*args, **kwargs):
    print("saving", flush=True)
    time.sleep(60)
checkpoints.save_run = announce_then_wait
"""


# The cache build of a run, stopped after its first chunk is on disk (a signal then surely arrives mid-build).
WAIT_FOR_A_SIGNAL_IN_THE_CACHE_BUILD = """
import sys, time
sys.path.insert(0, {root!r})
from util import cli, latent_cache
import train
write = latent_cache._write_at
def write_then_wait(path, offset, tensor):
    write(path, offset, tensor)
    if path.endswith("done.u8"):
        print("chunk", flush=True)
        time.sleep(60)
latent_cache._write_at = write_then_wait
cli.run_cli(lambda: train.main({argv!r}))
"""


def test_a_sigterm_in_the_cache_build_ends_every_process_with_one_line(tmp_path):
    """SIGTERM while the latent cache is built by two loader workers: one line, no traceback, every process gone
    (the chunks on disk are kept for the next run). Ctrl-C there raises KeyboardInterrupt, the same path."""
    argv = tiny_flags(str(tmp_path / "data"), str(tmp_path / "run"), num_workers=2, image_size=32, patch_size=1)
    process = subprocess.Popen([sys.executable, "-c", WAIT_FOR_A_SIGNAL_IN_THE_CACHE_BUILD.format(root=ROOT,
                                                                                                  argv=argv)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    assert process.stdout.readline().strip() == "chunk", end_within_30_s(process)[-2000:]
    assert len(group_members(process.pid)) == 3   # the training process and its two loader workers, mid-build
    process.send_signal(signal.SIGTERM)
    err = end_within_30_s(process)
    assert process.returncode == 143, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "terminated (SIGTERM)", err


# A process killed in the middle of writing a checkpoint: torch.save writes part of the new file, then hangs.
KILLED_WHILE_SAVING = """
import sys, time, torch
sys.path.insert(0, {root!r})
from util import checkpoints
def save_half_then_hang(obj, file):
    file.write(b"the first half of a new checkpoint")
    file.flush()
    print("writing", flush=True)
    time.sleep(600)
checkpoints.torch.save = save_half_then_hang
checkpoints.save_atomic(dict(kind=checkpoints.CHECKPOINT_KIND, step=2), {path!r})
"""


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    checkpoints.save_atomic(dict(kind=checkpoints.CHECKPOINT_KIND, step=1), path)
    old = (tmp_path / "checkpoint.pt").read_bytes()
    process = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_SAVING.format(root=ROOT, path=path)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        temporary = [name for name in os.listdir(tmp_path) if name != "checkpoint.pt"]
        assert temporary == [f"checkpoint.pt.tmp-{process.pid}"]          # the new file is written beside it ...
        assert (tmp_path / temporary[0]).read_bytes() == b"the first half of a new checkpoint"
        assert (tmp_path / "checkpoint.pt").read_bytes() == old           # ... and the old one is untouched
    finally:
        process.kill()
        process.wait()
    assert checkpoints.load_checkpoint(path)["step"] == 1                  # killed mid-write: the old one loads


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    checkpoints.save_atomic(dict(kind=checkpoints.CHECKPOINT_KIND, step=1), path)

    def disk_full(obj, file):
        file.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.save_atomic(dict(kind=checkpoints.CHECKPOINT_KIND, step=2), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert checkpoints.load_checkpoint(path)["step"] == 1


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: train.main(tiny_flags(data_dir, str(out), steps=50, save_every=1, warmup_steps=0,
                                                  lr=1e30)))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss became" in message and "at step" in message
    bad_step = int(message.split("at step ")[1].split(";")[0])
    checkpoint = checkpoints.load_checkpoint(str(out))
    assert checkpoint["step"] == bad_step - 1
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def make_image_folder(root, classes=("cat", "dog"), modes=("RGB", "L", "RGBA", "P", "CMYK"), per_class=10):
    from PIL import Image
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                mode = modes[i % len(modes)]
                image = Image.new("RGB", (40 + i, 30 + label), (40 * i % 255, 100, 200 * label)).convert(mode)
                image.save(folder / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")


def test_image_folder_with_every_colour_mode(tmp_path):
    make_image_folder(tmp_path / "data")
    train.main(tiny_flags(str(tmp_path / "data"), str(tmp_path / "run"), dataset="imagefolder", image_size=64,
                          patch_size=2, steps=2, batch_size=8))
    assert checkpoints.load_checkpoint(str(tmp_path / "run"))["step"] == 2


def test_unreadable_image_is_named(tmp_path, capsys):
    make_image_folder(tmp_path / "data", per_class=8)
    (tmp_path / "data" / "train" / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(SystemExit):
        cli.run_cli(lambda: train.main(tiny_flags(str(tmp_path / "data"), str(tmp_path / "run"),
                                                  dataset="imagefolder", steps=1, batch_size=8)))
    assert "broken.png" in capsys.readouterr().err


def test_val_classes_must_match_train_classes(tmp_path):
    make_image_folder(tmp_path, per_class=2)
    (tmp_path / "val" / "bird").mkdir()
    (tmp_path / "val" / "dog" / "0.png").rename(tmp_path / "val" / "bird" / "0.png")
    with pytest.raises(cli.UserError, match="only in val: \\['bird'\\]"):
        datasets.load_image_source("imagefolder", str(tmp_path), "val", 64)
