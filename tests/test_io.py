"""Atomic writes: a failure mid-write leaves the previous file intact and no temporary behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fcn3_lightning.io import atomic_torch_save
from fcn3_lightning.training.checkpoint_io import AtomicCheckpointIO


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom mid-write")


def test_failed_save_keeps_the_good_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="boom mid-write"):
        atomic_torch_save({"w": torch.zeros(1000), "bad": _Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_checkpoint_io_saves_atomically(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "best.ckpt"
    io.save_checkpoint({"state_dict": {"a": torch.arange(3)}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["a"], torch.arange(3))
    with pytest.raises(RuntimeError):
        io.save_checkpoint({"state_dict": {"a": torch.zeros(2)}, "bad": _Unpicklable()}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["best.ckpt"]


_WRITE = """
import os, stat, sys, threading
from fcn3_lightning.io import atomic_path, atomic_torch_save, current_umask
out = sys.argv[1]
with atomic_path(out + "/a.txt") as tmp:
    tmp.write_text("a")
atomic_torch_save({"w": 1}, out + "/b.pt")
def plot():  # plots are published from a background thread
    with atomic_path(out + "/c.png") as tmp:
        tmp.write_bytes(b"png")
t = threading.Thread(target=plot)
t.start()
t.join()
before = current_umask()
after = os.umask(0o077)  # reading it must not have changed it
print(oct(before), oct(after), *(oct(stat.S_IMODE(os.stat(out + "/" + n).st_mode)) for n in ("a.txt", "b.pt", "c.png")))
"""


@pytest.mark.parametrize(("umask", "want"), [(0o022, "0o644"), (0o027, "0o640"), (0o077, "0o600")])
def test_published_files_get_the_mode_the_umask_gives(tmp_path, umask, want):
    """mkstemp makes 0600 files; that mode used to survive the rename, so others could not read checkpoints."""
    res = subprocess.run(
        [sys.executable, "-c", _WRITE, str(tmp_path)], capture_output=True, text=True, preexec_fn=lambda: os.umask(umask), timeout=120
    )
    assert res.returncode == 0, res.stderr
    print(f"umask {oct(umask)}: {res.stdout.strip()}")
    assert res.stdout.split() == [oct(umask), oct(umask), want, want, want]


def _folder(path, text):
    path.mkdir()
    (path / "data").write_text(text)
    return path


def test_publish_folder_replaces_a_folder_or_file_and_leaves_nothing_behind(tmp_path):
    from fcn3_lightning.io import publish_folder

    out = _folder(tmp_path / "out.zarr", "old")
    publish_folder(_folder(tmp_path / ".new", "new"), out)
    assert (out / "data").read_text() == "new"
    (tmp_path / "plain").write_text("a file where the store goes")
    publish_folder(_folder(tmp_path / ".new2", "newer"), tmp_path / "plain")
    assert (tmp_path / "plain" / "data").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "plain"]  # no temporary, no old copy


def test_publish_folder_puts_the_old_folder_back_when_the_rename_fails(tmp_path):
    from fcn3_lightning.io import publish_folder

    out = _folder(tmp_path / "out.zarr", "old")
    with pytest.raises(FileNotFoundError):
        publish_folder(tmp_path / ".missing", out)  # the rename into place fails after the old one was moved aside
    assert (out / "data").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_publish_folder_without_replace_never_touches_an_existing_store(tmp_path):
    from fcn3_lightning.io import publish_folder

    out = _folder(tmp_path / "out.zarr", "theirs")
    new = _folder(tmp_path / ".new", "mine")
    with pytest.raises(OSError):
        publish_folder(new, out, replace=False)
    assert (out / "data").read_text() == "theirs" and (new / "data").read_text() == "mine"


def test_only_io_renames_outputs_into_place():
    """Atomic publishing has one home: every module that publishes a file or folder goes through fcn3_lightning.io
    (runs.py's ``runs/latest`` is a symbolic link, repointed with a rename of its own)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for folder in ("fcn3_lightning", "eval", "callbacks"):
        for f in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("replace", "rename"):
                    if isinstance(node.func.value, ast.Name) and node.func.value.id == "os":
                        found.append(str(f.relative_to(root)))
    assert sorted(set(found)) == ["fcn3_lightning/io.py", "fcn3_lightning/runs.py"]
