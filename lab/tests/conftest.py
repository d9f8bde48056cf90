"""pytest's settings for the lab's tests: the core's (tests/support.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests"))

from support import ROOT, data_dir, tiny_flags  # noqa: E402,F401  (data_dir: a fixture for every test file)
