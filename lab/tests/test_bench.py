"""Smoke tests of lab/bench.py: the measuring functions on tiny models, and the CLI's last line. Never speed targets."""

import json
import math

import pytest
import torch

from lab import bench
import lmd


@pytest.fixture
def one_thread():
    """Tiny ops on two threads stall whenever the machine is busy; one thread keeps the test to a second or two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measure_tiny_training_and_inference_rows(one_thread):
    device = torch.device("cpu")
    plan = dict(rounds=2, vae_rounds=1)
    data = bench.FakeData(8, 32, 4, 4, device)
    trainer = bench.Trainer(bench.SMOKE, 4, 8, 2, device, compile_model=False)
    classifier = lmd.LatentClassifier(lmd.MaskedLatentViT("tiny", 4, 2, 4), 10).eval()
    rows = [
        bench.training_row("train", "a", "LMD", "tiny", trainer, data.latent_batch, None, 4, None, device),
        bench.training_row("train_pixels", "a", "pixel MAE", "tiny", bench.Trainer(bench.SMOKE, 3, 1, 8, device, False),
                           data.image_batch, lmd.LatentProjection(), 4, None, device, heavy=True),
        bench.inference_row("classify", "e", "classifier", "tiny", classifier, classifier, data.latent_batch, None, 4,
                            None, device, baseline="train"),
        bench.matmul_row("matmul", "a", 64, torch.float32, device),
    ]
    bench.measure(rows, plan, device)
    assert [len(row.times) for row in rows] == [2, 1, 2, 2]
    results = bench.summarise(rows)
    for key in ("train", "train_pixels", "classify"):
        result = results[key]
        for field in ("images_per_second", "gflops_per_image", "mfu", "peak_mib", "tflops"):
            assert math.isfinite(result[field]) and result[field] > 0, (key, field, result[field])
    # the FLOP counter (CPU attention included) agrees with the MAE formula
    formula = bench.analytic_training_flops("tiny", trainer.model, 4, bench.MASK_RATIO)
    assert abs(rows[0].flops / formula - 1) < 0.05
    # peak memory holds at least the weights and AdamW's two moments
    assert results["train"]["peak_mib"] * 2 ** 20 >= 3 * sum(p.numel() * 4 for p in trainer.model.parameters())
    assert results["classify"]["speedup"] > 0


def test_smoke_run_ends_with_one_json_line(capsys, tmp_path):
    threads = torch.get_num_threads()
    bench.main(["--smoke", "--device", "cpu", "--json-out", str(tmp_path / "bench.json")])
    assert torch.get_num_threads() == threads   # restored after the run
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    for key in ("speedup_vs_pixel_mae", "cache_speedup", "mfu"):
        assert math.isfinite(summary[key]) and summary[key] > 0
    assert summary["device"] == "cpu" and summary["torch"] == torch.__version__
    assert set(summary["targets"]) == set(bench.TARGETS)
    assert json.loads((tmp_path / "bench.json").read_text())["mode"] == "smoke"
    assert any(line.startswith("a  LMD pretraining") for line in lines)   # the table came first
    assert set(summary["objective_images_per_second"]) == {"lmd", "ddpm", "maskdm"}   # and every objective


def test_nominal_peak_by_device_name():
    """MFU against the datasheet needs the right row: the more specific names match first, other dtypes none."""
    bf16 = torch.bfloat16
    peaks = {name: bench.nominal_peak_tflops(name, bf16) for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
             "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S", "NVIDIA L40", "NVIDIA L4", "Tesla V100-SXM2-32GB")}
    assert list(peaks.values()) == [989, 756, 989, 312, 362, 181, 121, None]
    assert bench.nominal_peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) is None
