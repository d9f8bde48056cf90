"""lab/family.py end to end on tiny settings: a one-stage row that cannot generate (MAE) and a two-stage row
(MaskDM, stage 2 from stage 1 by --init), each probed beside the same floors (the LMD network's random init, the raw
pixels), MaskDM at both model times and its own init apart, the generative one judged."""

import json

import pytest

from lab import family
from lab import pictures
from util import cli


def test_family_end_to_end(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(pictures, "SAMPLE_GRID_IMAGES", 4)   # train.py's sample grids: 4 images, 2 DDIM steps
    monkeypatch.setattr(pictures, "SAMPLE_GRID_STEPS", 2)
    out, docs = tmp_path / "family", tmp_path / "docs"
    argv = ["--dataset", "synthetic", "--synthetic-size", "64", "--image-size", "32", "--vae", "none",
            "--patch-size", "8", "--data-dir", data_dir, "--steps", "2", "--batch-size", "16", "--seeds", "1",
            "--rows", "mae,maskdm", "--linprobe-epochs", "2", "--num-images", "8", "--sampling-steps", "2",
            "--out", str(out), "--docs", str(docs)]
    records = family.main(argv)
    rows = {record["row"]: record for record in records}
    assert set(rows) == {"mae", "maskdm"}
    for record in records:
        for probe in ("knn", "linprobe"):
            for name in ("top1", "random_init", "raw_pixels"):
                assert 0 <= record[f"{probe}_{name}"] <= 1
        assert record["training_seconds"] > 0 and record["features"] == "cls"
    # every row's floor is the same LMD network; MaskDM's own init and both its model times are apart
    assert rows["mae"]["knn_random_init"] == rows["maskdm"]["knn_random_init"]
    assert rows["mae"]["knn_raw_pixels"] == rows["maskdm"]["knn_raw_pixels"]
    assert "knn_own_init" not in rows["mae"] and rows["mae"]["probe_time"] is None
    assert rows["maskdm"]["probe_time"] == 1 and rows["maskdm"]["knn_top1"] == rows["maskdm"]["knn_time1"]
    assert {"knn_own_init", "knn_time0", "linprobe_own_init", "linprobe_time0"} <= set(rows["maskdm"])
    assert "fd_normalised" not in rows["mae"]                                  # MAE cannot generate
    assert rows["maskdm"]["num_images"] == 8 and rows["maskdm"]["classes_present"] >= 1
    stage2 = json.loads((out / "maskdm" / "seed0" / "stage2-ddpm" / "config.json").read_text())
    assert stage2["init_from"]["objective"] == "maskdm" and stage2["steps"] == 1       # the budget split in half
    table = (docs / "family.md").read_text()
    assert "python -m lab.family --dataset synthetic" in table                # the command that made it
    assert "| MAE (constant 0.75) | 1 | no time (LMD) |" in table and "cannot generate" in table
    assert "`--features cls`" in table and "its own init (chance for adaLN-Zero)" in table
    assert "Raw pixels (no encoder" in table and "| kNN, model time 0 (clean) |" in table
    assert (docs / "family.png").stat().st_size > 5000 and (docs / "family_maskdm.png").exists()
    assert not (docs / "family_mae.png").exists()
    # a second call finds every record and trains nothing, and keeps the notes below the NOTES line
    (docs / "family.md").write_text(table + f"\n{family.NOTES}\n## A person's reading\n")
    assert family.main(argv) == records
    assert (docs / "family.md").read_text().endswith(f"{family.NOTES}\n## A person's reading\n")
    # with the other reading it probes again, and only that
    (mean,) = family.main(argv + ["--rows", "mae", "--features", "mean"])   # the last --rows counts
    assert mean["features"] == "mean" and mean["training_seconds"] == rows["mae"]["training_seconds"]
    assert (out / "mae" / "seed0" / "stage1-lmd" / "knn-mean" / "results.json").exists()
    assert "`--features mean`" in (docs / "family.md").read_text()
    # every floor was measured once: the second row's probes read them from the seed's floors file
    floors = json.loads((out / "floors-seed0.json").read_text())
    assert floors["knn cls random_init"] == rows["maskdm"]["knn_random_init"]
    maskdm_knn = json.loads((out / "maskdm" / "seed0" / "stage2-ddpm" / "knn" / "results.json").read_text())
    assert "random_init_top1" not in maskdm_knn and "raw_pixels_top1" not in maskdm_knn
    assert "own_init_top1" in maskdm_knn                                      # the first ddpm network of the seed
    # a finished stage is kept (not trained again) only if its settings match
    args, stage1 = family.build_parser().parse_args(argv), str(out / "maskdm" / "seed0" / "stage1-maskdm")
    assert family.finished(stage1, family.train_argv(args, "maskdm", {}, 1, 0, stage1))
    assert not family.finished(str(tmp_path / "nothing"), family.train_argv(args, "maskdm", {}, 1, 0, stage1))
    with pytest.raises(cli.UserError, match=r"finished run with other settings \(steps\)"):
        family.finished(stage1, family.train_argv(args, "maskdm", {}, 5, 0, stage1))
    # a seconds budget (steps from the kept step costs) is another budget: the same directory is refused
    (out / "step_costs.json").write_text(json.dumps({family.stage_key(*stage): 0.01 for row in ("mae", "maskdm")
                                                     for stage in family.ROWS[row]}))
    with pytest.raises(cli.UserError, match="another budget"):
        family.main(argv + ["--seconds", "10"])


def test_seconds_budget_steps_from_step_costs(tmp_path, data_dir):
    """--seconds: each stage's steps are its share of the seconds over its own seconds per step, timed once and
    kept (OUT/step_costs.json)."""
    args = family.build_parser().parse_args(["--dataset", "synthetic", "--synthetic-size", "64", "--image-size", "32",
                                             "--vae", "none", "--patch-size", "8", "--data-dir", data_dir,
                                             "--batch-size", "8", "--out", str(tmp_path), "--seconds", "3"])
    costs = family.seconds_per_step(args, family.ROWS["mae"] + family.ROWS["maskdm"], rounds=1, points=2)
    assert set(costs) == {family.stage_key(*stage) for row in ("mae", "maskdm") for stage in family.ROWS[row]}
    assert all(0 < seconds < 1 for seconds in costs.values())
    assert json.loads((tmp_path / "step_costs.json").read_text()) == costs     # kept: later calls time nothing
    assert family.seconds_per_step(args, family.ROWS["maskdm"]) == costs
    fake = {key: 0.01 * (index + 1) for index, key in enumerate(costs)}
    maskdm = [family.stage_key(*stage) for stage in family.ROWS["maskdm"]]
    assert family.stage_steps(args, "maskdm", fake) == [round(1.5 / fake[maskdm[0]]), round(1.5 / fake[maskdm[1]])]
    args.seconds = None
    assert family.stage_steps(args, "maskdm") == [750, 750] and family.stage_steps(args, "mae") == [1500]


def test_pareto_front_known_values():
    """The front of the generative rows on their means: one row beaten on both columns is off it."""
    record = lambda row, seed, knn, fd=None: dict(row=row, seed=seed, knn_top1=knn,   # noqa: E731
                                                  **({} if fd is None else dict(fd_normalised=fd)))
    records = [record("mae", 0, 0.9), record("ddpm", 0, 0.7, 0.2), record("ddpm", 1, 0.7, 0.4),
               record("umd", 0, 0.8, 0.5), record("maskdm", 0, 0.6, 0.35), record("lmd_ddpm", 0, 0.8, 0.6)]
    assert family.pareto_front(records) == ["umd", "ddpm"]     # maskdm (0.35, 0.6) and lmd_ddpm (0.6, 0.8) are beaten
    assert family.row_means(records)["ddpm"] == pytest.approx((0.3, 0.1414, 0.7, 0.0), abs=1e-4)
