"""tools/family.py end to end on tiny settings: a one-stage row that cannot generate (MAE) and a two-stage row
(MaskDM, stage 2 from stage 1 by --init), each probed beside its random init, the generative one judged."""

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
        assert 0 <= record["knn_top1"] <= 1 and 0 <= record["knn_random_init"] <= 1
        assert 0 <= record["linprobe_top1"] <= 1 and 0 <= record["linprobe_random_init"] <= 1
        assert record["training_seconds"] > 0
    assert "fd_normalised" not in rows["mae"]                                  # MAE cannot generate
    assert rows["maskdm"]["num_images"] == 8 and rows["maskdm"]["classes_present"] >= 1
    stage2 = json.loads((out / "maskdm" / "seed0" / "stage2-ddpm" / "config.json").read_text())
    assert stage2["init_from"]["objective"] == "maskdm" and stage2["steps"] == 1       # the budget split in half
    table = (docs / "family.md").read_text()
    assert "python tools/family.py --dataset synthetic" in table                # the command that made it
    assert "| MAE (constant 0.75) | 1 |" in table and "cannot generate" in table
    assert (docs / "family.png").stat().st_size > 5000 and (docs / "family_maskdm.png").exists()
    assert not (docs / "family_mae.png").exists()
    # a second call finds every record and trains nothing
    assert family.main(argv) == records
