"""The command table of ``python -m fcn3_lightning`` and the configs as installed: every command listed and reachable with
the same ``--help``, the fit options of ``curriculum`` handed on in order, and a regular (non-editable) install that runs
``fit`` on the default world from another folder with ``configs/base.yaml`` applied."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fcn3_lightning.__main__ import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "COLUMNS": "200"}


#: the commands the README shows
README_COMMANDS = ["fit", "validate", "test", "curriculum", "sweep", "summary", "convert", "export", "stats", "default-world"]
README_COMMANDS += ["convert-era5", "predict", "evaluate", "leaderboard"]


def test_help_lists_every_command_of_the_table(capsys):
    assert list(COMMANDS) == README_COMMANDS
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        line = re.search(rf"^    {re.escape(name)}\s+(.*)$", out, re.M)
        assert line is not None and command.help.startswith(line[1]), f"{name}:\n{out}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_its_help_under_the_same_program_name(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fcn3_lightning"])  # as `python -m` sees it (LightningCLI warns about pytest's own)
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    # LightningCLI's usage puts its own [options] before the subcommand
    assert out.startswith((f"usage: python -m fcn3_lightning {name} ", f"usage: python -m fcn3_lightning [options] {name} ")), out[:200]


def test_a_bad_command_or_option_exits_2(capsys):
    for argv in (["nosuch"], ["summary", "configs/model/fcn3.yaml", "--bogus"], []):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2, argv
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_curriculum_hands_every_other_option_to_fit_in_order():
    parser, own = build_parser("curriculum")
    argv = ["--stages", "a.yaml", "b.yaml", "--trainer.max_epochs", "1", "--run_name", "cur", "--model.net={}", "--data.valid_rollout", "1"]
    args, rest = parser.parse_known_args(["curriculum", *argv])
    assert args.stages == ["a.yaml", "b.yaml"] and args.run_name == "cur" and args.root is None
    assert rest == ["--trainer.max_epochs", "1", "--model.net={}", "--data.valid_rollout", "1"]
    args, rest = parser.parse_known_args(["curriculum", "--trainer.default_root_dir=out", "--trainer.max_epochs", "1"])
    assert args.stages is None and args.root == "out" and rest == ["--trainer.max_epochs", "1"]


def _dependency_dirs() -> list[str]:
    """The folders the running interpreter imports the dependencies (and pip, setuptools) from, in that order."""
    dirs: list[str] = []
    for module in ("torch", "lightning", "jsonargparse", "mlflow", "optuna", "zarr", "xarray", "setuptools", "pip"):
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{module} is not importable"
        folder = str(Path(spec.origin).parents[1])
        if folder not in dirs:
            dirs.append(folder)
    return dirs


@pytest.mark.slow  # the install takes seconds; the two 12-step rollouts of the default fit about a minute of CPU
def test_a_regular_install_runs_fit_on_the_default_world_from_another_folder(tmp_path):
    # the sources as a user's checkout has them (pip builds in the source folder: build/ stays out of this checkout)
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("fcn3_lightning", "callbacks", "eval", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, src / file)
    # a fresh venv that sees this environment's packages (no download), with fcn3_lightning installed as a wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True)
    Path(site.stdout.strip(), "_deps.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    # --ignore-installed: an fcn3-lightning visible through the .pth file is not this venv's to uninstall
    pip = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed", str(src)]
    res = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    shutil.rmtree(src)  # nothing left to import from but the install

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    show = "import fcn3_lightning.cli as c; print(c.__file__); print(c.BASE_CONFIG)"
    where = subprocess.run([python, "-c", show], cwd=elsewhere, capture_output=True, text=True)
    module, base = where.stdout.split()
    installed = Path(site.stdout.strip()) / "fcn3_lightning"
    assert Path(module).parent == installed and Path(base) == installed / "configs" / "base.yaml", where.stdout + where.stderr

    fit = [python, "-m", "fcn3_lightning", "fit", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    res = subprocess.run(fit, cwd=elsewhere, capture_output=True, text=True, env=ENV, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # configs/base.yaml applied: its MLflow store, its checkpoint file name and its network (LightningCLI would run
    # without a default config file it cannot find, with Lightning's logger and the module's default network)
    assert (elsewhere / "mlruns.db").is_file(), sorted(p.name for p in elsewhere.iterdir())
    last = elsewhere / "runs" / "latest" / "checkpoints" / "last.ckpt"
    assert last.is_file(), res.stdout[-3000:]
    blob = torch.load(last, map_location="cpu", weights_only=False)
    base_net = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())["model"]["net"]
    assert {k: blob["hyper_parameters"]["net"][k] for k in base_net} == base_net
    assert blob["global_step"] == 2
