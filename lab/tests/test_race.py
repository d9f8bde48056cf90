"""lab/race.py end to end on tiny settings: pixel MAE, LMD and MAE on latents under one budget of training
seconds, with a small random VAE saved as tools/train_vae.py would (so no VAE training here), and the files it
writes. The budget is enforced: every final point lands within 5% of it. Then the reading of the results on made-up
numbers: equal seconds on both clocks, the order of the methods, the speed flag, the time to pixel MAE's accuracy."""

import json

import pytest
import torch

from lab import race

BUDGET_MINUTES = 2 / 60   # 2 s of training per method (6 s in all, plus the probes): steps of ~0.01 s
# Digits at their native 8 px: 4 latent tokens (2 x 2 latents, patch 1) and 4 pixel tokens (--pixel-patch 4), so
# that the probes' forward passes over all 1,797 images cost little; the plumbing and the clock are the same at any
# size.


def small_vae(path):
    """A random AutoencoderKL of downsampling 4 in the SD layout, saved with a training.json like train_vae.py's."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        mid_block_add_attention=False)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(dict(dataset="digits", seconds=12.5, val_psnr_db=0.0)))


@pytest.fixture(scope="module")
def race_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("race")
    small_vae(tmp_path / "vae")
    out, threads = tmp_path / "race", torch.get_num_threads()
    race.main(["--threads", "1",    # one thread: on a busy shared CPU, two threads per process can be many times slower
               "--dataset", "digits", "--vae", str(tmp_path / "vae"), "--minutes", str(BUDGET_MINUTES),
               "--image-size", "8", "--pixel-patch", "4", "--probes", "2", "--batch-size", "16",
               "--linprobe-epochs", "2", "--probe-train", "1000", "--device", "cpu", "--out", str(out)])
    torch.set_num_threads(threads)
    return out, json.loads((out / "results.json").read_text())


def test_every_final_point_lands_within_5_percent_of_the_budget(race_run):
    _, results = race_run
    budget = BUDGET_MINUTES * 60
    assert results["budget_seconds"] == pytest.approx(budget)
    for name in ("pixel_mae", "lmd", "latent_mae"):
        points = results[name]
        assert len(points) == 2, name
        assert points[0]["train_seconds"] < points[1]["train_seconds"] and points[0]["step"] < points[1]["step"]
        assert abs(points[1]["train_seconds"] - budget) <= 0.05 * budget, (name, points[1]["train_seconds"])
        assert points[1]["images"] == points[1]["step"] * 16
    assert race.off_budget(results) == []


def test_both_clocks_and_the_random_inits(race_run):
    out, results = race_run
    vae = results["vae"]
    # the VAE's training and the training split's encoding are counted; the val split's encoding serves the probes
    assert vae["offset_seconds"] == pytest.approx(vae["training_seconds"] + vae["encode_seconds"])
    assert vae["encode_seconds"] > 0 and vae["val_encode_seconds"] > 0 and vae["training_seconds"] == 12.5
    offset = vae["offset_seconds"]
    for name in ("pixel_mae", "lmd", "latent_mae"):
        for point in results[name]:
            counted = point["train_seconds"] + (offset if name != "pixel_mae" else 0.0)
            assert point["seconds"] == pytest.approx(counted)
            assert 0 <= point["knn_top1"] <= 1 and 0 <= point["linprobe_top1"] <= 1
            assert point["steps_per_second"] == pytest.approx(point["step"] / point["train_seconds"])
            assert point["images_per_second"] == pytest.approx(point["images"] / point["train_seconds"])
    # the cosine schedule ramps up with the training clock; the constant one does not move
    assert results["lmd"][0]["mask_ratio"] < results["lmd"][1]["mask_ratio"] <= 0.75
    assert results["latent_mae"][0]["mask_ratio"] == results["latent_mae"][1]["mask_ratio"] == 0.75
    assert {space: len(records) for space, records in results["random"].items()} == {"pixels": 1, "latents": 1}
    assert results["tokens"] == {"pixels": 4, "latents": 4} and results["patch_size"] == {"pixels": 4, "latents": 1}
    assert results["vae"]["trained_by"] == "tools/train_vae.py" and results["peak_rss_mb"] > 100
    assert results["order"] == [["pixel_mae", "lmd", "latent_mae"]]
    assert set(results["time_to_pixel_mae"]) == {"lmd", "latent_mae"}
    summary = results["time_to_pixel_mae"]["lmd"]["knn_top1"]["seconds"]
    assert summary["seeds"] == 1 and summary["per_seed"][0]["target"] == results["pixel_mae"][-1]["knn_top1"]
    tables = (out / "race.md").read_text().split("\n\n")
    table, ratios = tables[0].splitlines(), tables[1].splitlines()
    assert "VAE counted" in table[0] and len(table) == 7 and "steps/s" in table[0]
    assert table[2].startswith("| pixel_mae |") and table[-1].startswith("| random init (latents")
    assert "pixel MAE's time" in ratios[0] and [row.split(" |")[0] for row in ratios[2:]] == ["| lmd", "| latent_mae"]
    assert (out / "race.png").stat().st_size > 10_000


def made_up(curves, random, offset=0.0, budget=360.0):
    """Results as race.main writes them, from curves {method: {seed: [(train_seconds, kNN, linear probe), ...]}} and
    random inits {space: {seed: (kNN, linear probe)}}; one step a second."""
    results = dict(budget_seconds=budget, vae=dict(offset_seconds=offset), random={
        space: [dict(seed=seed, knn_top1=knn, linprobe_top1=linear) for seed, (knn, linear) in seeds.items()]
        for space, seeds in random.items()})
    for name, runs in curves.items():
        shift = offset if race.METHODS[name][0] == "latents" else 0.0
        results[name] = [dict(seed=seed, step=round(t), train_seconds=t, seconds=shift + t, knn_top1=knn,
                              linprobe_top1=linear, steps_per_second=1.0, images_per_second=64.0)
                         for seed, run in runs.items() for t, knn, linear in run]
    return results


RANDOM = dict(pixels={0: (0.5, 0.9)}, latents={0: (0.4, 0.8)})


def test_a_reading_between_two_points_is_the_straight_line_through_them():
    points = [dict(seconds=100.0, v=0.5), dict(seconds=200.0, v=0.9)]
    assert race.value_at(points, "seconds", 175.0, "v") == pytest.approx(0.8)
    assert race.value_at(points, "seconds", 99.0, "v") is None                  # not started yet
    assert race.value_at(points, "seconds", 205.0, "v") == 0.9                  # within 5%: the run's end
    assert race.value_at(points, "seconds", 220.0, "v") is None                 # ended 10% early: not read there
    assert race.time_to_reach(points, "seconds", "v", 0.8) == pytest.approx(175.0)
    assert race.time_to_reach(points, "seconds", "v", 0.91) is None


def test_the_vae_counted_clock_reads_a_latent_method_at_the_budget_not_at_its_last_point_before_it():
    pixels, late = [(180.0, 0.7, 0.9), (360.0, 0.8, 0.9)], [(180.0, 0.5, 0.9), (360.0, 0.8, 0.9)]
    # VAE + encoding 120 s: LMD's points on the counted clock are at 300 and 480 s; at 360 s it is a third of the way
    results = made_up(dict(pixel_mae={0: pixels}, lmd={0: late}), RANDOM, offset=120.0)
    assert race.readings(results, "lmd", "seconds", "knn_top1") == [pytest.approx(0.6)]   # the old rule read 0.5
    assert race.readings(results, "pixel_mae", "seconds", "knn_top1") == [pytest.approx(0.8)]
    row = "| lmd | 0.800 ± 0.000 | 0.900 ± 0.000 | "   # its own clock: the final point, as for pixel MAE
    assert row + "0.600 ± 0.000 (after 240 s of training) |" in race.summarise(results)
    # offset 300 s: before its first point, LMD is read between its start (its random init, 0.4) and that point
    results = made_up(dict(pixel_mae={0: pixels}, lmd={0: late}), RANDOM, offset=300.0)
    assert race.readings(results, "lmd", "seconds", "knn_top1") == [pytest.approx(0.4 + 0.1 / 3)]
    results = made_up(dict(pixel_mae={0: pixels}, lmd={0: late}), RANDOM, offset=400.0)
    assert row + "not started (VAE + encoding take longer) |" in race.summarise(results)
    # a run whose last point is 60 s before the budget has no reading there, on either clock
    results = made_up(dict(pixel_mae={0: [(150.0, 0.7, 0.9), (300.0, 0.8, 0.9)]}), RANDOM)
    assert race.readings(results, "pixel_mae", "train_seconds", "knn_top1") == [None]
    assert "1 of 1 seeds ended more than 5% before the budget" in race.summarise(results)


def test_the_order_of_the_methods_rotates_with_the_seed():
    orders = [race.method_order(list(race.METHODS), seed) for seed in range(3)]
    assert len({tuple(order) for order in orders}) == 3
    assert all(sorted(order) == sorted(race.METHODS) for order in orders)
    assert race.method_order(["lmd", "pixel_mae"], 1) == ["pixel_mae", "lmd"]


def test_a_seed_more_than_2x_off_its_methods_median_speed_is_flagged():
    run = [(180.0, 0.7, 0.9), (360.0, 0.8, 0.9)]
    results = made_up(dict(pixel_mae={0: run, 1: run, 2: run}, lmd={0: run, 1: run, 2: run},
                           latent_mae={0: run, 1: run, 2: run}),
                      {space: {seed: inits[0] for seed in range(3)} for space, inits in RANDOM.items()})
    speeds = dict(pixel_mae=(1.0, 1.1, 0.4), lmd=(1.0, 2.05, 0.9), latent_mae=(1.0, 1.9, 0.55))   # medians 1.0
    for name, (first, second, third) in speeds.items():
        for point, speed in zip(results[name][1::2], (first, second, third)):
            point["steps_per_second"] = speed
    assert race.speed_outliers(results) == [("pixel_mae", 2, 0.4, 1.0), ("lmd", 1, 2.05, 1.0)]
    warnings = race.warnings(results)
    assert len(warnings) == 2 and warnings[0].startswith("warning: pixel_mae seed 2 ran 0.40 steps/s")
    rows = race.summarise(results).splitlines()
    assert rows[2].endswith("; seed 2: 0.40, more than 2x off the median 1.00 |") and "more than 2x" not in rows[4]


def test_time_to_pixel_maes_accuracy_as_a_ratio_on_both_clocks():
    pixels = [(180.0, 0.7, 0.85), (360.0, 0.8, 0.88)]   # reaches its final kNN at 360 s; its random init's linear
    # probe (0.9) is already above its final one, so there is no pixel MAE time to divide by
    curves = dict(pixel_mae={0: pixels, 1: pixels},
                  lmd={0: [(180.0, 0.9, 0.95), (360.0, 0.95, 0.96)],      # from 0.4 at 0 s: 0.8 at 144 s
                       1: [(180.0, 0.6, 0.95), (360.0, 0.9, 0.96)]},      # 0.8 at 300 s
                  latent_mae={0: [(180.0, 0.6, 0.5), (360.0, 0.7, 0.6)], 1: [(180.0, 0.6, 0.5), (360.0, 0.7, 0.6)]})
    random = dict(pixels={0: (0.5, 0.9), 1: (0.5, 0.9)}, latents={0: (0.4, 0.8), 1: (0.4, 0.8)})
    ratios = race.time_ratios(made_up(curves, random, offset=60.0))
    own = ratios["lmd"]["knn_top1"]["train_seconds"]
    assert [s["ratio"] for s in own["per_seed"]] == [pytest.approx(0.4), pytest.approx(300 / 360)]
    assert own["seeds_reached"] == 2 and own["mean"] == pytest.approx((0.4 + 300 / 360) / 2)
    assert own["std"] == pytest.approx((300 / 360 - 0.4) / 2 ** 0.5)
    counted = ratios["lmd"]["knn_top1"]["seconds"]["per_seed"]
    assert [s["ratio"] for s in counted] == [pytest.approx(204 / 360), pytest.approx(1.0)]
    assert {s["ratio"] for s in ratios["lmd"]["linprobe_top1"]["seconds"]["per_seed"]} == {
        "n/a: pixel MAE's random init is already there"}
    never = ratios["latent_mae"]["knn_top1"]["train_seconds"]
    assert never["mean"] == "not reached" and never["seeds_reached"] == 0
    assert [s["method"] for s in never["per_seed"]] == ["not reached"] * 2
    table = race.ratio_table(ratios).splitlines()
    assert table[2] == ("| lmd | 0.62 ± 0.31 (2 of 2 seeds) | 0.78 ± 0.31 (2 of 2 seeds) | n/a: pixel MAE's random "
                        "init is already there | n/a: pixel MAE's random init is already there |")
    assert table[3] == "| latent_mae | not reached | not reached | not reached | not reached |"


def test_the_clock_waits_for_an_apple_gpu(monkeypatch):
    from lab import bench
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("cuda"))
    for module in (race, bench):
        module.synchronize(torch.device("mps"))
        module.synchronize(torch.device("cpu"))
    assert calls == ["mps", "mps"]


def test_a_step_longer_than_the_budget_is_reported():
    point = dict(seed=0, train_seconds=10.0, seconds=10.0, knn_top1=0.5, linprobe_top1=0.5)
    results = dict(budget_seconds=6.0, pixel_mae=[point], lmd=[dict(point, train_seconds=6.1)])
    assert race.off_budget(results) == [("pixel_mae", 0, 10.0)]


def test_compact_inputs_flip_on_the_fly():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    data = dict(space="pixels", train_inputs=images)
    inputs = race.batch_inputs(data, "train", torch.tensor([2, 0]), torch.tensor([1, 0]), torch.device("cpu"))
    assert inputs.dtype == torch.float32 and inputs.shape == (2, 3, 8, 8)
    assert torch.allclose(inputs[0], (images[2].float() / 255 * 2 - 1).flip(-1))
    assert torch.allclose(inputs[1], images[0].float() / 255 * 2 - 1)


def test_throughput_waits_for_an_apple_gpu(monkeypatch):
    """util/devices.images_per_second (finetune.py's throughput) syncs the device around its timed calls, mps too."""
    from util import devices
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    assert devices.images_per_second(lambda: None, 1, torch.device("mps"), repeats=1) > 0
    assert calls == ["mps", "mps"]


def test_the_probes_read_a_fixed_subset_when_asked(race_run):
    _, results = race_run
    assert results["probe_images"] == dict(train=1000, val=360)   # digits: 1,437 train, 360 val
    subset = race.probe_subset(1437, 1000)
    assert len(subset) == len(set(subset.tolist())) == 1000 and subset.max() < 1437
    assert torch.equal(subset, race.probe_subset(1437, 1000))     # the same for every method and seed
    assert torch.equal(race.probe_subset(360, None), torch.arange(360))


def test_a_method_whose_random_init_already_reaches_pixel_maes_final_is_at_init_not_0_00():
    """A random init above pixel MAE's final accuracy reaches it at 0 s: said in words, never read as a speed-up."""
    pixels = [(180.0, 0.55, 0.85), (360.0, 0.6, 0.88)]
    curves = dict(pixel_mae={0: pixels}, lmd={0: [(180.0, 0.7, 0.9), (360.0, 0.75, 0.95)]},
                  latent_mae={0: [(180.0, 0.5, 0.5), (360.0, 0.7, 0.95)]})
    random = dict(pixels={0: (0.5, 0.8)}, latents={0: (0.63, 0.8)})   # the latents' random init: 0.63 > 0.6
    ratios = race.time_ratios(made_up(curves, random, offset=60.0))
    knn = ratios["lmd"]["knn_top1"]["train_seconds"]
    assert [s["ratio"] for s in knn["per_seed"]] == ["at init: its random init is already there"]
    assert knn["seeds_reached"] == 0 and race.ratio_cell(knn) == "at init: its random init is already there"
    assert isinstance(ratios["lmd"]["linprobe_top1"]["train_seconds"]["per_seed"][0]["ratio"], float)
