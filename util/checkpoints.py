"""Checkpoints: atomic saves, loading with one-line errors, and the model a run config describes."""

import os

import torch

import lmd
from util.cli import UserError
from util.datasets import check_geometry


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


CHECKPOINT_KIND = "lmd-pretraining"

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


def build_model(config, projection):
    """The masked latent ViT described by a run config (dict with model, image_size, patch_size)."""
    grid = check_geometry(config["image_size"], projection.downsample, config["patch_size"])
    return lmd.MaskedLatentViT(config["model"], grid, config["patch_size"], projection.channels)
