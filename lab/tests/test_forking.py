"""A fork adds an objective in one file (lab/tests/forked_objective.py, the example of docs/forking.md): train.py's
and finetune.py's loops (python -m lab.train, lab.finetune), the grids and the schedules figure take it with no edit.
Older run directories (configs written before the objectives had records) still resume, probe and sample."""

import json
import os
import re

import pytest
import torch

import forked_objective
import finetune
import lab
import lab.finetune   # lab.finetune.main and lab.train.main: the core's scripts given the lab's objectives
import lab.train
from lab import sample
import train
from util import checkpoints, pictures
from support import ROOT
from lab_support import defaults, drawn
PIXELS = dict(vae="none", image_size=32, patch_size=8, synthetic_size=64)


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    """The forked objective registered for this module only (other test files see the built-in four)."""
    lab.register(forked_objective.OBJECTIVE)
    yield forked_objective.OBJECTIVE
    lab.OBJECTIVES.pop(forked_objective.OBJECTIVE.name)


@pytest.fixture(scope="module")
def forked_run(forked, tmp_path_factory):
    from support import tiny_flags
    root = tmp_path_factory.mktemp("fork")
    run = root / "run"
    lab.train.main(tiny_flags(str(root / "data"), str(run), steps=3, objective="falling-l1", **PIXELS))
    return run


def test_a_forked_objective_trains_through_train_py(forked_run):
    config = json.loads((forked_run / "config.json").read_text())
    assert config["objective"] == "falling-l1" and config["mask_start"] == 0.9 and not config["normalize_targets"]
    ratios = [json.loads(line)["mask_ratio"] for line in (forked_run / "metrics.jsonl").read_text().splitlines()]
    assert ratios == pytest.approx([0.9 - 0.3 * step / 3 for step in range(3)])   # its own, falling schedule
    summary = json.loads((forked_run / "summary.json").read_text())
    assert summary["held_out_l1_at_0_75"] > 0 and summary["held_out_mask_ratio"] == 0.75
    assert (forked_run / "grid_final.png").stat().st_size > 5_000     # its grid: reconstructions
    model = checkpoints.build_model(config, pictures.lmd.LatentProjection(), lab.get(config["objective"]))
    assert type(model) is forked_objective.FallingL1


def test_a_forked_objective_is_probed_by_finetune_py(forked_run):
    lab.finetune.main(["--checkpoint", str(forked_run), "--mode", "knn", "--no-raw-pixels", "--num-workers", "0",
                       "--device", "cpu"])
    results = json.loads((forked_run / "knn" / "results.json").read_text())
    assert 0 <= results["top1"]["final"] <= 1 and "random_init_top1" in results


def test_its_flags_come_from_its_record_and_the_others_are_refused(forked, tmp_path, capsys):
    from support import tiny_flags
    help_text = lab.train.build_parser().format_help()
    assert "falling-l1: the ratio at the start" in help_text and "'falling-l1': LMD with a falling" in help_text
    with pytest.raises(SystemExit):
        train.cli.run_cli(lambda: lab.train.main(tiny_flags(str(tmp_path), str(tmp_path / "r"),
                                                            objective="falling-l1", scheduler="cosine", **PIXELS)))
    assert "--scheduler does not apply to --objective falling-l1" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # a schedule that leaves (0, 1) is refused before any data is read
        train.cli.run_cli(lambda: lab.train.main(tiny_flags(str(tmp_path), str(tmp_path / "r"),
                                                            objective="falling-l1", mask_end=0.0, **PIXELS)))
    assert "strictly between 0 and 1" in capsys.readouterr().err


def test_the_schedules_figure_takes_any_number_of_schedules(forked, tmp_path, monkeypatch):
    schedules = {name: lmd_schedule for name, lmd_schedule in
                 ((name, pictures.lmd.MaskSchedule(name)) for name in pictures.lmd.SCHEDULERS)}
    schedules["falling"] = forked.schedule(dict(mask_start=0.9, mask_end=0.6))
    figure = drawn(monkeypatch, lambda: pictures.plot_schedules(str(tmp_path / "five.png"), schedules=schedules))
    curves = {line.get_label(): line for line in figure.axes[0].lines if not line.get_label().startswith("_")}
    assert list(curves) == [*pictures.lmd.SCHEDULERS, "falling"]
    assert list(curves["falling"].get_ydata()) == [schedules["falling"](p) for p in curves["falling"].get_xdata()]


def test_docs_forking_shows_the_file_as_it_is():
    text = open(os.path.join(ROOT, "docs", "forking.md")).read()
    code = open(forked_objective.__file__).read()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert block == code and len(code.splitlines()) <= 60


def test_no_script_compares_an_objectives_name():
    paths = ["train.py", "finetune.py", os.path.join("lab", "sample.py")] + [
        os.path.join(folder, name) for folder in ("util", "tools") for name in os.listdir(os.path.join(ROOT, folder))
        if name.endswith(".py")]
    for path in paths:
        source = open(os.path.join(ROOT, path)).read()
        assert not re.search(r'[!=]= "lmd"', source), path


# ----------------------------------------------------------------------------- older run directories

def strip_config(run, keys):
    """Rewrite a run's checkpoint and config.json as a run from before `keys` existed."""
    path = run / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=False)
    for key in keys:
        checkpoint["config"].pop(key, None)
    torch.save(checkpoint, path)
    (run / "config.json").write_text(json.dumps(checkpoint["config"]))


OBJECTIVE_KEYS = ("objective", "init", "block_size", "clean_share", "clean_mask_ratio", "snr_gamma")


def test_an_lmd_run_from_before_the_records_resumes_and_probes(tmp_path):
    from support import tiny_flags
    train.main(tiny_flags(str(tmp_path / "data"), str(tmp_path / "run"), steps=4, stop_after_step=2, **PIXELS))
    strip_config(tmp_path / "run", OBJECTIVE_KEYS)
    train.main(["--resume", str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 4
    finetune.main(["--checkpoint", str(tmp_path / "run"), "--mode", "knn", "--no-raw-pixels", "--num-workers", "0",
                   "--device", "cpu"])
    assert json.loads((tmp_path / "run" / "knn" / "results.json").read_text())["top1"]["final"] >= 0


def test_a_ddpm_run_from_before_the_weighting_samples(tmp_path):
    config = dict(defaults("ddpm"), model="tiny", steps=2, dataset="synthetic", data_dir=str(tmp_path),
                  out=str(tmp_path / "run"), **PIXELS)
    torch.manual_seed(0)
    model = checkpoints.build_model(config, pictures.lmd.LatentProjection(), lab.get("ddpm"))
    checkpoints.save_run(str(tmp_path / "run" / "checkpoint.pt"), model, torch.optim.AdamW(model.parameters()), 2,
                         config, torch.device("cpu"))
    strip_config(tmp_path / "run", ("snr_gamma", "block_size", "clean_share", "clean_mask_ratio"))
    sample.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "samples"), "--num-images", "2",
                 "--sampling-steps", "2", "--no-judge", "--device", "cpu"])
    assert (tmp_path / "samples" / "samples.png").exists()
