"""pytest's settings for the core's tests: those of support.py, and the order the files run in."""

import os

from support import ROOT, data_dir, tiny_flags  # noqa: F401  (data_dir: a fixture for every test file)

# The longest files first, so that the two pytest workers (pytest.ini) finish together: a file runs whole on one
# worker, and the digits pretraining of test_finetune alone takes about a minute.
SLOWEST_FIRST = ("test_finetune.py", "test_reliability.py", "test_cluster.py", "test_race.py", "test_notebook.py",
                 "test_family.py", "test_relatives.py", "test_judge.py", "test_train_vae.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)
    items.sort(key=rank)   # stable: the order inside a file is kept
