"""tools/family.py end to end on tiny settings: a one-stage row that cannot generate (MAE) and a two-stage row
(MaskDM, stage 2 from stage 1 by --init), each probed beside the same floors (the LMD network's random init, the raw
pixels), MaskDM at both model times and its own init apart, the generative one judged."""

import json

import family
from util import pictures


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
    assert "python tools/family.py --dataset synthetic" in table                # the command that made it
    assert "| MAE (constant 0.75) | 1 | no time (LMD) |" in table and "cannot generate" in table
    assert "`--features cls`" in table and "its own init (chance for adaLN-Zero)" in table
    assert "Raw pixels (no encoder" in table and "| kNN, model time 0 (clean) |" in table
    assert (docs / "family.png").stat().st_size > 5000 and (docs / "family_maskdm.png").exists()
    assert not (docs / "family_mae.png").exists()
    # a second call finds every record and trains nothing; with the other reading it probes again, and only that
    assert family.main(argv) == records
    (mean,) = family.main(argv + ["--rows", "mae", "--features", "mean"])   # the last --rows counts
    assert mean["features"] == "mean" and mean["training_seconds"] == rows["mae"]["training_seconds"]
    assert (out / "mae" / "seed0" / "stage1-lmd" / "knn-mean" / "results.json").exists()
    assert "`--features mean`" in (docs / "family.md").read_text()
