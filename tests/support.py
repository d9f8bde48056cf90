"""What every test shares, the core's and the lab's (lab/tests/conftest.py reads it too): everything offline,
tiny, and on the CPU."""

import os
import sys

# One intra-op thread, here and in every subprocess a test starts (set before torch is imported): the tests run tiny
# models, which a second thread barely speeds up, and on a busy 2-core CPU two spinning threads per process thrash
# (measured: a 100-step digits run took 71 s with one thread, 590 s with two, beside other jobs).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))   # train_vae.py, run_notebook.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the network


def tiny_flags(data_dir, out, steps=8, **overrides):
    """train.py flags for a run of a few seconds: synthetic data, the untrained tiny VAE, the tiny model."""
    flags = dict(dataset="synthetic", synthetic_size=64, vae="tiny", model="tiny", batch_size=16, steps=steps,
                 data_dir=data_dir, out=out, log_every=1, save_every=4, eval_images=16, num_workers=0, device="cpu")
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key.replace('_', '-')}")
        elif value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One data directory for the whole session, so the latent cache is built once."""
    return str(tmp_path_factory.mktemp("data"))


