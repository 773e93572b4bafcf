"""A process of a torchrun launch (tests/test_runs.py): asks for two new run folders, as ``fit`` and ``curriculum`` do,
and writes what it got to ``<out>/rank<k>.txt``. The ranks start seconds apart, so their clocks read different
seconds: they must agree all the same."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from fcn3_lightning.runs import new_run_folder

rank = int(os.environ["RANK"])
time.sleep(1.5 * rank)
first = new_run_folder("fit")
second = new_run_folder("fit")
Path(sys.argv[1], f"rank{rank}.txt").write_text(f"{first}\n{second}\n")
