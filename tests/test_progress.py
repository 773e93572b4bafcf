"""Progress where a batch job's log can show it: plain lines when the stream is not a terminal, a bar when it is.

(The fit's progress lines are tested with a real fit in test_cli_outputs.py.)
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from tqdm import tqdm

from fcn3_lightning.progress import LineProgress, progress_bar


def test_default_world_generation_prints_progress_lines_into_a_pipe(tmp_path):
    """The first minutes of the default fit build the default world: a log must show that work going on."""
    code = (
        "import sys; from fcn3_lightning.data.default_world import generate_default_world; "
        "generate_default_world(sys.argv[1], years=0.02, spinup_days=2.0)"  # 8 spin-up + 30 stored 6-hourly steps
    )
    out = tmp_path / "w.zarr"
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    print("\n".join(lines))
    assert "\r" not in res.stderr  # lines, not a bar redrawing itself
    assert re.match(r"default world: simulating 0.02 years \(30 states, 6-hourly\) on a 33x64 grid after a 2-day spin-up", lines[0])
    steps = [int(m.group(1)) for ln in lines if (m := re.match(r"default world w\.zarr: (\d+)/38 6h steps", ln))]
    assert steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 38]  # every 10 % (4 steps) and the last
    assert any("spin-up day 1 of 2" in ln for ln in lines) and any("simulated day 7.5 of 7.5" in ln for ln in lines)
    assert re.fullmatch(rf"default world: wrote {re.escape(str(out))} in \d+ s", lines[-1])


def test_line_progress_prints_every_tenth_and_where_it_stopped():
    buf = io.StringIO()
    with LineProgress(25, "job", "items", file=buf) as bar:
        for _ in range(12):
            bar.update()
        bar.set_postfix_str("half")
        bar.update(1)
    shown = [int(m.group(1)) for m in re.finditer(r"job: (\d+)/25 items", buf.getvalue())]
    assert shown == [2, 4, 6, 8, 10, 12, 13]  # every 2 (10 % of 25, rounded), then 13, where it stopped, at close
    assert "(52%), half |" in buf.getvalue().splitlines()[-1]


def test_a_terminal_gets_a_bar_and_a_log_gets_lines():
    assert isinstance(progress_bar(10, "job", "items", file=io.StringIO()), LineProgress)
    main, other = os.openpty()
    with os.fdopen(other, "w") as tty:
        bar = progress_bar(10, "job", "items", file=tty)
        assert isinstance(bar, tqdm)
        bar.close()
    os.close(main)
