"""The study folder ``<out>/<study name>``: which study it belongs to.

The folder is named by the study's name only, and two storages can each hold a study of that name: without a
record, a second study reused the first one's ``trial_*`` folders and replaced its ``best.yaml``. The first worker
of a study writes ``study.json`` (the study's identity, its storage and Optuna study id); a worker of another study
stops at once, while the workers of the same study, on any machine and under any spelling of the storage URL, share it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import optuna

from fcn3_lightning.io import atomic_path
from fcn3_lightning.sweep.space import SweepError

OWNER_FILE = "study.json"
UID_ATTR = "fcn3_sweep_uid"  # the study's identity: a random id set once, in the storage, when the study is created


def study_uid(study: optuna.Study) -> str:
    """The study's identity (created on first use; call under the study lock)."""
    uid = study.user_attrs.get(UID_ATTR)
    if uid is None:
        uid = uuid.uuid4().hex
        study.set_user_attr(UID_ATTR, uid)
    return uid


def storage_label(storage: str) -> str:
    """The storage as a user can find it again from anywhere: file paths made absolute, passwords hidden."""
    for prefix in ("sqlite:///", "journal:"):
        if storage.startswith(prefix) and not storage.startswith("sqlite:////"):
            return prefix + str(Path(storage[len(prefix) :]).resolve())
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", storage)


def claim(folder: Path, study: optuna.Study, storage: optuna.storages.BaseStorage, storage_url: str) -> None:
    """Record ``folder`` as ``study``'s, or raise :class:`SweepError` when it belongs to another study (call under the
    study lock, before anything is written into the folder)."""
    uid = study_uid(study)
    mine = {
        "study_name": study.study_name,
        "storage": storage_label(storage_url),
        "study_id": storage.get_study_id_from_name(study.study_name),
        "uid": uid,
    }
    path = folder / OWNER_FILE
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        owner = None
    except ValueError as e:
        raise SweepError(f"{path} is not readable JSON ({e}); it records which study {folder} belongs to") from e
    if owner is None:
        earlier = (folder / "best.yaml").exists() or any(folder.glob("trial_*"))
        if earlier and not study.get_trials(deepcopy=False):
            # written before folders recorded their study: a new, empty study cannot be the one that wrote them
            raise SweepError(
                f"{folder} holds trials of an earlier sweep whose study is not recorded, and study {study.study_name!r} in "
                f"{mine['storage']} has none: pass another --out or --study-name (or --storage of the study that wrote them)"
            )
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({**mine, "claimed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
        return
    if owner.get("uid") != uid:
        raise SweepError(
            f"{folder} belongs to study {owner.get('study_name')!r} (id {owner.get('study_id')}) in {owner.get('storage')}, but this "
            f"sweep's study {study.study_name!r} (id {mine['study_id']}) in {mine['storage']} is another one: pass another --out or "
            f"--study-name to keep both, or --storage {owner.get('storage')} to continue that study"
        )
