"""The core stands alone: no core file imports the lab, and in a copy of the tree with lab/ deleted LMD trains,
stops and resumes, is probed (knn, linprobe, finetune), and the core's tests are all collected."""

import os
import re
import shutil
import subprocess
import sys

from support import ROOT

CORE = ["lmd.py", "train.py", "finetune.py",
        *(os.path.join(folder, name) for folder in ("util", "tools", "tests")
          for name in sorted(os.listdir(os.path.join(ROOT, folder))) if name.endswith(".py"))]

# In the copy, in one process (one torch import): train, stop at step 4, resume to 8, then the three probes.
SCRIPT = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import finetune, train
from util import cli
out, data = sys.argv[1], sys.argv[2]
tiny = ["--dataset", "synthetic", "--synthetic-size", "64", "--vae", "tiny", "--model", "tiny", "--batch-size", "16",
        "--steps", "8", "--data-dir", data, "--out", out, "--eval-images", "16", "--num-workers", "0",
        "--device", "cpu", "--grid-every", "0"]
train.main(tiny + ["--stop-after-step", "4"])
assert json.load(open(os.path.join(out, "config.json")))["steps"] == 8 and not os.path.exists(out + "/summary.json")
train.main(["--resume", out])
assert json.load(open(os.path.join(out, "summary.json")))["step"] == 8
for mode, extra in (("knn", []), ("linprobe", ["--epochs", "2"]), ("finetune", ["--epochs", "1"])):
    finetune.main(["--checkpoint", out, "--mode", mode, "--batch-size", "16", "--num-workers", "0", "--device", "cpu",
                   "--out", os.path.join(out, mode), *extra])
    print(mode, json.load(open(os.path.join(out, mode, "results.json")))["top1"]["final"])
import pytest   # the core's tests, collected in the same process (one torch import less)
sys.exit(pytest.main(["--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider", "tests"]))
"""


def test_no_core_file_imports_the_lab():
    importing = [path for path in CORE
                 if re.search(r"^\s*(import lab\b|from lab\b)", open(os.path.join(ROOT, path)).read(), re.M)]
    assert importing == [], importing


def test_without_the_lab_lmd_trains_resumes_is_probed_and_its_tests_are_collected(tmp_path):
    copy = tmp_path / "core"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "lab", "runs", "data", "__pycache__"))
    assert not (copy / "lab").exists() and (copy / "lmd.py").exists()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run"), str(tmp_path / "data")], cwd=copy,
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [line.split()[0] for line in run.stdout.splitlines()[:3]] == ["knn", "linprobe", "finetune"]
    assert re.search(r"^\d+ tests collected", run.stdout, re.M), run.stdout[-500:]
