"""lab/curve.py end to end on tiny settings: ddpm and MaskDM's two stages, each judged at points of its last stage
(stopped and resumed by train.py), the seconds of every stage summed; and the time-to-reach arithmetic."""

import json
import math

import pytest

from lab import curve
from lab import pictures


def test_curve_end_to_end(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(pictures, "SAMPLE_GRID_IMAGES", 4)
    monkeypatch.setattr(pictures, "SAMPLE_GRID_STEPS", 2)
    out, docs = tmp_path / "curve", tmp_path / "docs"
    argv = ["--dataset", "synthetic", "--synthetic-size", "64", "--image-size", "32", "--vae", "none",
            "--patch-size", "8", "--data-dir", data_dir, "--steps", "4", "--points", "2", "--batch-size", "16",
            "--seeds", "1", "--rows", "maskdm", "--maskdm-mask-ratio", "0.5", "--num-images", "8",
            "--sampling-steps", "2", "--out", str(out), "--docs", str(docs)]
    records = curve.main(argv)
    (maskdm,) = records
    assert [p["step"] for p in maskdm["points"]] == [1, 2]                # points of the last stage only
    seconds = [p["seconds"] for p in maskdm["points"]]
    assert 0 < seconds[0] < seconds[1] and all(math.isfinite(p["fd_normalised"]) for p in maskdm["points"])
    assert len(maskdm["seconds_per_step"]) == 2 and maskdm["points"][0]["seconds"] > 2 * maskdm["seconds_per_step"][0]
    stage1 = json.loads((out / "maskdm" / "seed0" / "stage1-maskdm" / "config.json").read_text())
    stage2 = json.loads((out / "maskdm" / "seed0" / "stage2-ddpm" / "config.json").read_text())
    assert stage1["mask_ratio"] == 0.5 and stage2["init_from"]["objective"] == "maskdm"
    summary = json.loads((out / "maskdm" / "seed0" / "stage2-ddpm" / "summary.json").read_text())
    assert summary["step"] == 2                                        # stopped at 1, resumed to the end
    text = (docs / "curve.md").read_text()
    assert "python -m lab.curve --dataset synthetic" in text and "| MaskDM (stage 1, then stage 2) | 2 | 2 |" in text
    assert (docs / "curve.png").stat().st_size > 5000
    # the timed clock: each point's steps times its stages' step costs, timed side by side and kept
    costs = json.loads((out / "step_costs.json").read_text())
    assert set(costs) == {"maskdm mask_ratio=0.5", "ddpm"}
    assert maskdm["points"][1]["timed_seconds"] == pytest.approx(2 * costs["maskdm mask_ratio=0.5"] + 2 * costs["ddpm"])
    assert "Timed side by side in one process" in text
    assert curve.main(argv) == records                                 # finished curves are read, not retrained


def test_time_to_reach_interpolates_between_points():
    points = [dict(seconds=10.0, fd_normalised=0.8), dict(seconds=20.0, fd_normalised=0.4),
              dict(seconds=30.0, fd_normalised=0.2)]
    assert curve.time_to_reach(points, 0.6) == (pytest.approx(15.0), "")
    assert curve.time_to_reach(points, 0.9) == (10.0, "<=")
    assert curve.time_to_reach(points, 0.1) == (None, None)
    records = [dict(row="ddpm", seed=0, points=[dict(seconds=40.0, fd_normalised=0.3)]),
               dict(row="maskdm", seed=0, points=points)]
    assert curve.ratios(records) == {"maskdm": [(pytest.approx((20 + 0.5 * 10) / 40), "")]}
    for record in records:
        record["seconds_per_step"] = [0.1]
        for point in record["points"]:
            point.update(step=1, classes_present=10, timed_seconds=point["seconds"] / 2)
    records[0]["points"][0]["timed_seconds"] = 10.0   # ddpm by the timed clock: 25 / 2 over 10
    assert curve.ratios(records, "timed_seconds") == {"maskdm": [(pytest.approx(12.5 / 10), "")]}
    assert curve.fd_at(points, 25.0) == pytest.approx(0.3) and curve.fd_at(points, 5.0) is None
    assert curve.equal_seconds(records) == {"maskdm": [(0.2, None)]}        # ddpm's one point is at 10 timed seconds
    records[0]["points"].append(dict(seconds=50.0, timed_seconds=20.0, fd_normalised=0.1, step=2, classes_present=9))
    assert curve.equal_seconds(records) == {"maskdm": [(0.2, pytest.approx(0.2))]}   # at 15: halfway, 0.3 to 0.1
    records[0]["points"].pop()
    text = curve.table(records, {"ddpm": 0.1})
    assert "- MaskDM (stage 1, then stage 2), by train.py's clock: 0.62 of ddpm's time, per seed" in text
    assert "- MaskDM (stage 1, then stage 2), by timed step costs: 1.25 of ddpm's time, per seed" in text
