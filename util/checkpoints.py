"""Checkpoints: atomic saves, a run's state (weights, optimizer, RNG), loading with one-line errors, its model."""

import os

import torch

from util.cli import UserError
from util.datasets import check_geometry
from util.objective import of

CHECKPOINT_KIND = "lmd-pretraining"
# What --init must agree on: the same latent space and the same token layout.
INIT_MUST_MATCH = ("vae", "image_size", "patch_size", "model")


def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, fsync, then rename into place: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def rng_state(device):
    """The global RNG states worth saving: the CPU's and this process's own GPU's (not every visible GPU's)."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def saved_cuda_rng_state(saved):
    """The CUDA RNG state [ByteTensor] to restore on this process's GPU from a checkpoint's rng["cuda"], or None.
    Older checkpoints hold one state per GPU the saver saw (its own first); restoring them all fails on fewer GPUs."""
    if saved is None or torch.is_tensor(saved):
        return saved
    return saved[0] if len(saved) else None


def restore_rng_state(rng, device):
    torch.set_rng_state(rng["cpu"])
    cuda = saved_cuda_rng_state(rng.get("cuda"))
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def save_run(path, model, optimizer, step, config, device):
    """A pretraining run's checkpoint: everything --resume needs to continue it exactly."""
    save_atomic(dict(kind=CHECKPOINT_KIND, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                     config=config, torch_version=torch.__version__, rng=rng_state(device)), path)


def load_checkpoint(path, kind=CHECKPOINT_KIND):
    """Load a checkpoint written by train.py (a run directory or a file); anything else is a clear UserError."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist; give a run directory or its checkpoint.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"checkpoint {path!r} is unreadable (truncated or not a torch file: "
                        f"{type(error).__name__}); use an earlier checkpoint or rerun") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != kind:
        raise UserError(f"{path!r} is not an LMD {kind.split('-')[-1]} checkpoint (made by "
                        f"{'train.py' if kind == CHECKPOINT_KIND else 'finetune.py'})")
    return checkpoint


def load_model_state(model, state_dict, path):
    """load_state_dict with a one-line error when the checkpoint's architecture differs from the model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UserError(f"checkpoint {path!r} does not match the model ({first}); "
                        "check --model, --patch-size, --image-size and --vae") from None


def build_model(config, projection, objective):
    """The network of a run config (model, image_size, patch_size, the objective's own keys) and its `objective`."""
    grid = check_geometry(config["image_size"], projection.downsample, config["patch_size"])
    return objective.build(config, grid, projection.channels)


def load_init(model, path, config, objectives):
    """--init RUN: copy the weights of an earlier run (of one of `objectives`) into a new run's `model`. -> a record.
    Every tensor whose name and shape fit, but from LMD only the encoder (its decoder fills in masked tokens, no use
    to a denoiser: see Objective.decoder_transfers); the rest keeps its fresh initialisation."""
    checkpoint = load_checkpoint(path)
    source = checkpoint["config"]
    for key in INIT_MUST_MATCH:
        if source.get(key) != config.get(key):
            raise UserError(f"--init {path!r} was trained with --{key.replace('_', '-')} {source.get(key)}, this run "
                            f"has {config.get(key)}; use the same value")
    objective = of(source, objectives)
    own, decoder_parts = model.state_dict(), tuple(model.DECODER_PARTS)
    taken = {name: tensor for name, tensor in checkpoint["model"].items()
             if name in own and own[name].shape == tensor.shape
             and (objective.decoder_transfers or not name.startswith(decoder_parts))}
    if not any(name.startswith("blocks.") for name in taken):
        raise UserError(f"--init {path!r}: none of its encoder blocks fit this model; check --model and --patch-size")
    model.load_state_dict(taken, strict=False)
    fresh = sorted({name.split(".")[0] for name in own if name not in taken})
    return dict(run=path, objective=objective.name, step=checkpoint["step"], tensors_loaded=len(taken),
                tensors_fresh=len(own) - len(taken), fresh_parts=fresh)
