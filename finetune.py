"""
What pretraining learned, measured on the same latents: the kNN probe, the linear probe, or full fine-tuning.

    python finetune.py --checkpoint runs/lmd --mode knn          # weighted 20-NN on frozen features, seconds
    python finetune.py --checkpoint runs/lmd --mode linprobe     # frozen encoder, BN + linear head, 90 epochs
    python finetune.py --checkpoint runs/lmd --mode finetune     # everything trains, layer decay

knn and linprobe read the class token after the final norm (--features mean: the mean patch token) and measure,
in the same invocation, the baselines beside it: the LMD network of the same size and seed at random init and the raw
pixels. A relative's encoder (the lab's: python -m lab.finetune) is probed at model times 0 and 1. The VAE,
image size, patch size and model size come from the checkpoint. Writes OUT/results.json (top-1 best and final;
reports use final) and, for finetune, OUT/classifier.pt (the best epoch's classifier).
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lmd
import train
from util import checkpoints, cli, datasets, devices, latent_cache, optim, probes, sampling, vaes
from util.objective import of

# ----------------------------------------------------------------------------------------------------------------
# Defaults, in one block. None means: from the checkpoint (data, geometry) or from the mode's recipe (below).
DEFAULTS = dict(
    checkpoint=None, mode="linprobe", init="pretrained", features="cls", raw_pixels=True, skip_baselines=(), dataset=None,
    allow_other_dataset=False, data_dir=None, synthetic_size=None, vae=None, model=None, image_size=None,
    patch_size=None, epochs=None, batch_size=None, base_lr=None, lr=None, weight_decay=None, warmup_epochs=None,
    layer_decay=0.65, label_smoothing=None, precision="auto", encode_batch_size=vaes.ENCODE_CHUNK, num_workers=None,
    device="auto", seed=0, out=None, labels_per_class=None, subset_seed=0, eval_every=None,
)
BATCH_SIZE = 256   # with every label; with N labels per class: N rounded down to a power of 2, within [8, 256]
# MAE's recipes. Linear probe: 90 epochs, no weight decay, base lr 0.5 where MAE has 0.1: MAE's 0.1 is for LARS at
# batch 16,384; here plain SGD with momentum at 0.5 lands within 2 points of L-BFGS logistic regression on the same
# features in 90 epochs (tests/test_probing.py). kNN trains nothing.
# Fine-tuning: 100 epochs of AdamW, base lr 5e-4, weight decay 0.05, label smoothing 0.1 (layer decay: DEFAULTS).
RECIPES = dict(
    knn=dict(epochs=0, base_lr=0.0, weight_decay=0.0, warmup_epochs=0, label_smoothing=0.0),
    linprobe=dict(epochs=90, base_lr=0.5, weight_decay=0.0, warmup_epochs=10, label_smoothing=0.0),
    finetune=dict(epochs=100, base_lr=5e-4, weight_decay=0.05, warmup_epochs=5, label_smoothing=0.1),
)
CLASSIFIER_KIND = "lmd-classifier"   # so a classifier is never mistaken for a pretraining checkpoint
GEOMETRY = ("vae", "model", "image_size", "patch_size")
TRAINING_FLAGS = ("epochs", "base_lr", "lr", "weight_decay", "warmup_epochs", "label_smoothing")
PROBE_FLAGS = ("features", "raw_pixels", "skip_baselines")
BASELINES = ("random_init", "own_init", "raw_pixels")


def build_parser():
    parser = cli.ArgumentParser(description="Linear probe or fine-tuning of an LMD encoder on VAE latents.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS)   # unset flags: DEFAULTS fills them in
    add = parser.add_argument
    add("--checkpoint", required=True, metavar="RUN", help="pretraining run directory or its checkpoint.pt")
    add("--mode", choices=RECIPES, default=DEFAULTS["mode"],
        help="'knn': weighted 20-NN on frozen features; 'linprobe': frozen encoder, BatchNorm (no affine) + linear "
             "head on cached features; 'finetune': all weights train. knn and linprobe also probe the random init")
    add("--init", choices=("pretrained", "scratch"), default=DEFAULTS["init"],
        help="finetune: 'scratch' trains the same classifier from random weights (the baseline); the probes "
             "always measure both")
    add("--features", choices=probes.READINGS,
        help="what knn and linprobe read from the encoder's tokens after its final norm: 'cls' the class token "
             "(MAE's linear probe), 'mean' the mean of the patch tokens (MAE's global_pool); the baselines are read "
             "the same way (default: cls)")
    add("--raw-pixels", action=argparse.BooleanOptionalAction,
        help="knn and linprobe: also probe the flattened pixels of the same images, N x 3 x S x S floats in memory "
             "(default: on)")
    add("--skip-baselines", nargs="+", choices=BASELINES, help="knn and linprobe: baselines not to measure, because "
        "they are known: each depends only on the network, its seed and the data (lab/family.py measures each once a "
        "seed)")
    add("--dataset", choices=datasets.DATASETS, help="classification data (default: the checkpoint's)")
    add("--allow-other-dataset", action="store_true",
        help="allow a --dataset other than the pretraining one (transfer); the image size stays the checkpoint's")
    add("--data-dir", help="dataset root and latent cache (default: the checkpoint's)")
    add("--synthetic-size", type=int, help="training images of --dataset synthetic (default: the checkpoint's)")
    for flag, kind in zip(GEOMETRY, (vaes.vae_name, str, int, int)):   # a local VAE directory: its absolute path
        add(f"--{flag.replace('_', '-')}", type=kind,
            help=f"must match the checkpoint's {flag.replace('_', ' ')} if given (default: the checkpoint's)")
    add("--epochs", type=int, help="training epochs (default: 90 linprobe, 100 finetune)")
    add("--batch-size", type=int, help=f"global batch size (default: {BATCH_SIZE}; with --labels-per-class N, N "
                                       "rounded down to a power of 2, within [8, 256])")
    add("--labels-per-class", type=int, metavar="N", help="train (and fit every baseline) on N labelled training "
        "images per class only: a fixed class-balanced subset, the same for every encoder (default: every label)")
    add("--subset-seed", type=int, default=DEFAULTS["subset_seed"], help="seed of the --labels-per-class subset")
    add("--eval-every", type=int, metavar="E", help="finetune: top-1 on the validation split every E epochs and "
        "after the last (default: 1; with --labels-per-class, a tenth of the epochs)")
    add("--base-lr", type=float, help="lr = base_lr * batch_size / 256 (default: 0.5 linprobe, 5e-4 finetune)")
    add("--lr", type=float, help="absolute peak learning rate (overrides --base-lr)")
    add("--weight-decay", type=float, help="finetune's weight decay (default: 0.05; linprobe has none)")
    add("--warmup-epochs", type=float, help="linear warm-up before the cosine decay (default: 10 linprobe, 5 finetune)")
    add("--layer-decay", type=float, default=DEFAULTS["layer_decay"],
        help="finetune: block i of n trains at lr * decay^(n+1-i); 1 turns it off")
    add("--label-smoothing", type=float, help="finetune's label smoothing (default: 0.1; linprobe has none)")
    add("--precision", choices=("auto", "fp32", "bf16"), default=DEFAULTS["precision"],
        help="'auto': bf16 autocast on CUDA, fp32 elsewhere")
    add("--encode-batch-size", type=int, default=DEFAULTS["encode_batch_size"],
        help="images per call of the frozen VAE (building the latent cache; the throughput measurement)")
    add("--num-workers", type=int, help="image loading processes for pixel runs (default: the node's cores)")
    add("--device", choices=("auto", "cuda", "mps", "cpu"), default=DEFAULTS["device"], help="'auto': cuda first")
    add("--seed", type=int, default=DEFAULTS["seed"], help="seed for the head (and --init scratch), order, flips")
    add("--out", help="output directory (default: RUN/knn or RUN/linprobe, -mean added with --features mean; "
                      "RUN/finetune-<init>)")
    return parser


def resolve_config(flags, checkpoint_path, pretrained):
    """The run's config: the flags, the mode's recipe, and the data and geometry of the pretraining config."""
    missing = [key for key in (*GEOMETRY, "dataset", "data_dir") if key not in pretrained]
    if missing:
        raise cli.UserError(f"{checkpoint_path!r} has no {', '.join(missing)} in its config; was it written by an "
                            "older train.py? Pretrain again")
    config = {**DEFAULTS, **flags}
    if config["mode"] != "finetune" and config["init"] == "scratch":
        raise cli.UserError(f"--mode {config['mode']} already measures the random-init encoder (random_init_top1 in "
                            "results.json); drop --init scratch")
    given = [f"--{flag.replace('_', '-')}" for flag in PROBE_FLAGS if flag in flags]
    if given and config["mode"] == "finetune":
        raise cli.UserError(f"{' and '.join(given)} belong to knn and linprobe; --mode finetune reads the mean patch "
                            "token")
    ignored = [flag for flag in TRAINING_FLAGS if flag in flags and config["mode"] == "knn"]
    if ignored:   # one note, not an error: a sweep script may pass the same flags to every mode
        print(f"note: --mode knn trains nothing; ignoring --{', --'.join(f.replace('_', '-') for f in ignored)}",
              file=sys.stderr)
        config.update({flag: None for flag in ignored})
    unused = [f"--{flag.replace('_', '-')}" for flag in ("weight_decay", "label_smoothing") if flags.get(flag)]
    if unused and config["mode"] == "linprobe":   # the probe's head trains without either (MAE's recipe)
        raise cli.UserError(f"--mode linprobe uses no weight decay or label smoothing; drop {' and '.join(unused)}")
    for key, value in RECIPES[config["mode"]].items():
        config[key] = value if config[key] is None else config[key]
    for key in GEOMETRY:   # the classifier is the pretrained encoder: its input must be what it was trained on
        if config[key] is not None and config[key] != pretrained[key]:
            raise cli.UserError(f"--{key.replace('_', '-')} {config[key]} does not match the checkpoint, which was "
                                f"pretrained with {pretrained[key]}; drop the flag (it comes from the checkpoint)")
        config[key] = pretrained[key]
    same_dataset = config["dataset"] in (None, pretrained["dataset"])
    if not same_dataset and not config["allow_other_dataset"]:
        raise cli.UserError(f"--dataset {config['dataset']} does not match the checkpoint, which was pretrained on "
                            f"{pretrained['dataset']}; add --allow-other-dataset to transfer on purpose")
    config["dataset"] = config["dataset"] or pretrained["dataset"]
    config["data_dir"] = config["data_dir"] or pretrained["data_dir"]
    config["synthetic_size"] = config["synthetic_size"] or (pretrained.get("synthetic_size", 5000) if same_dataset
                                                            else 5000)
    few = config["labels_per_class"]
    config["batch_size"] = config["batch_size"] or (min(256, max(8, 2 ** int(math.log2(few)))) if few else BATCH_SIZE)
    config["eval_every"] = config["eval_every"] or (max(1, config["epochs"] // 10) if few else 1)
    config["lr"] = config["lr"] or config["base_lr"] * config["batch_size"] / 256
    is_dir = os.path.isdir(checkpoint_path)
    config["checkpoint"] = os.path.abspath(os.path.join(checkpoint_path, "checkpoint.pt") if is_dir
                                           else checkpoint_path)
    suffix = f"-{config['init']}" if config["mode"] == "finetune" else "-mean" * (config["features"] == "mean")
    config["out"] = config["out"] or os.path.join(os.path.dirname(config["checkpoint"]), config["mode"] + suffix)
    for flag in ("epochs", "batch_size", "labels_per_class", "eval_every"):
        if config[flag] is not None and config[flag] < (flag != "epochs" or config["mode"] != "knn"):
            raise cli.UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {config[flag]})")
    if not 0 < config["layer_decay"] <= 1 or not 0 <= config["label_smoothing"] < 1:
        raise cli.UserError("--layer-decay must lie in (0, 1] and --label-smoothing in [0, 1)")
    return config


class LabelSubset:
    """--labels-per-class N: N training images of each class, drawn once by --subset-seed (a class-balanced subset,
    the semi-supervised protocol), read like the latent_cache.Split it is cut from; every baseline reads it too."""

    def __init__(self, split, per_class, seed):
        labels = split.labels if split.latents is not None else torch.as_tensor(split.images.source.targets)
        generator, chosen = torch.Generator().manual_seed(seed), []
        for label, name in enumerate(split.classes):
            members = (labels == label).nonzero().flatten()
            if per_class > len(members):
                raise cli.UserError(f"--labels-per-class {per_class} is more than class {name!r} has ({len(members)} "
                                    f"training images); use at most {min(torch.bincount(labels).tolist())}")
            chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
        self.indices = torch.cat(chosen).sort().values
        self.split, self.classes, self.workers = split, split.classes, split.workers

    def __len__(self):
        return len(self.indices)

    @property
    def images(self):
        return torch.utils.data.Subset(self.split.images, self.indices.tolist())

    def batches(self, index_batches, flip_batches):
        return self.split.batches([self.indices[i] for i in index_batches], flip_batches)


def build_classifier(config, checkpoint, projection, num_classes, init, linear_probe, objectives, objective=None):
    """The classifier of `init`; 'scratch' is exactly the random encoder that pretraining started from. The network
    is the checkpoint's objective's, or `objective`'s ('lmd': the probes' random-init baseline), of the same size
    and seed."""
    torch.manual_seed(checkpoint["config"]["seed"])
    network = {**checkpoint["config"], **{key: config[key] for key in GEOMETRY}}
    network["objective"] = objective or network.get("objective", "lmd")
    autoencoder = checkpoints.build_model(network, projection, of(network, objectives))
    if init == "pretrained":
        checkpoints.load_model_state(autoencoder, checkpoint["model"], config["checkpoint"])
    torch.manual_seed(config["seed"])   # the head's initialisation
    return lmd.LatentClassifier(autoencoder, num_classes, linear_probe)


def run_probes(config, checkpoint, projection, train_data, val_data, dist, objectives):
    """knn or linprobe of every encoder of probes.probe_plan, then of the raw pixels -> (the results.json fields,
    the pretrained classifier)."""
    flips = (0,) if config["mode"] == "knn" or config["dataset"] in datasets.NO_FLIP else (0, 1)
    recipe = dict(epochs=config["epochs"], batch_size=config["batch_size"], seed=config["seed"],
                  base_lr=config["lr"] * 256 / config["batch_size"], warmup_epochs=config["warmup_epochs"])
    measured, pretrained = {}, None

    def measure(name, train, val):   # one probe, and one line on the main process
        measured[name] = probes.probe(config["mode"], train, val, device=dist.device, **recipe)
        final, count = measured[name][0]["final"], len(val_data)
        if dist.is_main:
            print(f"{config['mode']} top-1 ({config['features']}), {name.replace('_', ' ')}: {final:.4f} "
                  f"(val {count} images, standard error {probes.standard_error(final, count):.4f})", file=sys.stderr)

    pretrained_objective = of(checkpoint["config"], objectives)
    for name, (init, objective, model_time) in probes.probe_plan(checkpoint["config"], pretrained_objective).items():
        if name in config["skip_baselines"]:
            continue
        classifier = build_classifier(config, checkpoint, projection, len(train_data.classes), init, True,
                                      objectives, objective).to(dist.device)
        pretrained = pretrained or (classifier if init == "pretrained" else None)   # its inference speed is measured
        measure(name, *(probes.split_features(classifier, data, dist, views, config["features"], model_time,
                                              config["seed"], pretrained_objective.probe_inputs)
                        for data, views in ((train_data, flips), (val_data, (0,)))))
    if config["raw_pixels"] and "raw_pixels" not in config["skip_baselines"]:
        measure("raw_pixels", probes.split_pixels(train_data, dist, flips), probes.split_pixels(val_data, dist, (0,)))
    return probes.result_fields(measured, checkpoint["config"], pretrained_objective), pretrained


def run_finetune(config, checkpoint, train_data, val_data, dist, classifier, autocast):
    """Full fine-tuning (or --init scratch) with layer decay -> the results.json fields. Saves the best epoch."""
    groups = optim.layer_decay_groups(classifier, config["weight_decay"], config["layer_decay"])
    optimizer = torch.optim.AdamW(groups, lr=config["lr"], betas=(0.9, 0.999))
    train_model = torch.nn.parallel.DistributedDataParallel(classifier) if dist.enabled else classifier
    steps_per_epoch = len(train_data) // config["batch_size"]
    # A warm-up as long as training would never reach the peak lr: then warm up over the first tenth instead.
    warmup_epochs = config["warmup_epochs"] if config["warmup_epochs"] < config["epochs"] else config["epochs"] / 10
    total_steps, warmup_steps = config["epochs"] * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    flip = config["dataset"] not in datasets.NO_FLIP
    history, best = [], -1.0
    bar = tqdm(total=total_steps, desc=config["mode"], disable=not dist.is_main, dynamic_ncols=True)
    for epoch in range(config["epochs"]):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        indices = [sampling.batch_indices(step, len(train_data), config["batch_size"], config["seed"], dist.rank,
                                          dist.world_size) for step in steps]
        flips = [flip * torch.randint(0, 2, (len(i),), generator=sampling.step_generator(
                 config["seed"], step, dist.rank, stream="flips")) for i, step in zip(indices, steps)]
        train_model.train()
        loss_sum = torch.zeros((), device=dist.device)   # read once an epoch: no host sync per step
        for step, (inputs, labels) in zip(steps, train_data.batches(indices, flips)):
            lr = optim.learning_rate(step, total_steps, warmup_steps, config["lr"])
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            with torch.autocast(dist.device.type, dtype=autocast, enabled=autocast is not None):
                loss = F.cross_entropy(train_model(inputs), labels, label_smoothing=config["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            bar.update()
        train_loss = loss_sum.item() / steps_per_epoch
        if dist.any(not math.isfinite(train_loss)):   # every rank stops, with the same words, before any save
            raise cli.UserError(f"the loss became non-finite in epoch {epoch + 1}; lower --lr or use --precision fp32")
        if (epoch + 1) % config["eval_every"] and epoch + 1 < config["epochs"]:
            continue   # a few-label epoch is a few steps: 10,000 validation images each time would dominate
        top1 = probes.top1_accuracy(classifier, val_data, max(config["batch_size"], BATCH_SIZE), dist, autocast)
        history.append(dict(epoch=epoch + 1, train_loss=train_loss, top1=top1))
        if top1 > best and dist.is_main:   # keep the best epoch's classifier
            checkpoints.save_atomic(dict(kind=CLASSIFIER_KIND, model=classifier.state_dict(), epoch=epoch + 1,
                                         top1=top1, classes=train_data.classes, config=config,
                                         pretraining_config=checkpoint["config"], torch_version=torch.__version__),
                                    os.path.join(config["out"], "classifier.pt"))
        best = max(best, top1)
        bar.write(f"epoch {epoch + 1}/{config['epochs']}: train loss {history[-1]['train_loss']:.4f}, "
                  f"val top-1 {top1:.4f} (best {best:.4f})", file=sys.stderr)
    bar.close()
    return dict(top1=probes.summarise(history), history=history)


def main(argv=None, objectives=train.OBJECTIVES):
    """Probe or fine-tune a run of one of `objectives` ({name: Objective}; the lab passes its relatives too)."""
    flags = vars(build_parser().parse_args(argv))
    checkpoint = checkpoints.load_checkpoint(flags["checkpoint"])
    pretrained = checkpoint["config"]
    of(pretrained, objectives)   # a relative's run without the lab: one line, before any data is read
    config = resolve_config(flags, flags["checkpoint"], pretrained)
    dist = devices.Distributed(config["device"])
    if config["batch_size"] % dist.world_size:
        raise cli.UserError(f"--batch-size {config['batch_size']} must divide evenly over {dist.world_size} processes")
    projection = vaes.open_projection(config["vae"], dist.device, announce=dist.is_main)
    train_data, val_data = (latent_cache.Split(config, split, projection, dist) for split in ("train", "val"))
    if config["labels_per_class"]:
        train_data = LabelSubset(train_data, config["labels_per_class"], config["subset_seed"])
    if len(train_data) < config["batch_size"] and (config["mode"] == "finetune" or config["labels_per_class"]):
        raise cli.UserError(f"the training set has {len(train_data)} images, fewer than one batch "
                            f"(--batch-size {config['batch_size']}); lower --batch-size")
    autocast = devices.autocast_dtype(config["precision"], dist.device)
    if dist.is_main:
        os.makedirs(config["out"], exist_ok=True)
        if checkpoint.get("step", pretrained.get("steps")) != pretrained.get("steps"):
            print(f"note: an unfinished run (step {checkpoint['step']} of {pretrained['steps']})", file=sys.stderr)
        print(f"{config['mode']} of a {config['model']} encoder on {config['dataset']} ({len(train_data)} train / "
              f"{len(val_data)} val images, {len(train_data.classes)} classes), {dist.world_size} process(es) on "
              f"{dist.device}", file=sys.stderr)
    started = time.time()
    if config["mode"] == "finetune":
        classifier = build_classifier(config, checkpoint, projection, len(train_data.classes), config["init"], False,
                                      objectives)
        fields = run_finetune(config, checkpoint, train_data, val_data, dist, classifier.to(dist.device), autocast)
    else:
        fields, classifier = run_probes(config, checkpoint, projection, train_data, val_data, dist, objectives)
    if dist.is_main:
        results = dict(**fields, mode=config["mode"], init=config["init"], epochs=config["epochs"],
                       features=config["features"] if config["mode"] != "finetune" else "mean",
                       checkpoint=config["checkpoint"], dataset=config["dataset"], vae=config["vae"],
                       vae_provenance=pretrained.get("vae_provenance"), model=config["model"],
                       num_classes=len(train_data.classes), val_images=len(val_data), train_images=len(train_data),
                       labels_per_class=config["labels_per_class"], subset_seed=config["subset_seed"],
                       device=str(dist.device), world_size=dist.world_size, minutes=(time.time() - started) / 60,
                       config=config)
        path = os.path.join(config["out"], "results.json")
        for measured in (False, True):   # written before the optional measurement: nothing is lost if it fails
            if measured:
                batch = torch.stack([val_data.images[i][0] for i in range(min(64, len(val_data)))])
                with_vae, latents_only = probes.inference_throughput(classifier, projection, batch, dist.device,
                                                                     autocast, config["encode_batch_size"])
                results.update(images_per_second_with_vae=with_vae, images_per_second_latents_only=latents_only,
                               throughput_batch_size=len(batch))
            with open(path, "w") as file:
                json.dump(results, file, indent=2)
        scratch = (f", random init (LMD network) {results['random_init_top1']['final']:.4f}"
                   if "random_init_top1" in results else "")
        print(f"done: {config['mode']} top-1 {results['top1']['final']:.4f}{scratch}; inference {with_vae:.0f} "
              f"images/s with the VAE encoding, {latents_only:.0f} from latents; {path}", file=sys.stderr)
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli.run_cli(main)
