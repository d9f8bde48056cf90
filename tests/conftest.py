"""pytest's settings for the core's tests: those of support.py, and the order the files run in."""

import os

from support import ROOT, data_dir, tiny_flags  # noqa: F401  (data_dir: a fixture for every test file)

# The longest files first, so that the two pytest workers (pytest.ini) finish together: a file runs whole on one
# worker, and the digits pretraining of test_finetune alone takes about a minute (the probes on any checkpoint are
# test_probing.py's, so that they run on the other worker meanwhile).
SLOWEST_FIRST = ("test_finetune.py", "test_reliability.py", "test_probing.py", "test_cluster.py", "test_notebook.py",
                 "test_two_storeys.py", "test_relatives.py", "test_family.py", "test_judge.py", "test_ddpm_floor.py",
                 "test_train.py", "test_train_vae.py", "test_race.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)
    items.sort(key=rank)   # stable: the order inside a file is kept
