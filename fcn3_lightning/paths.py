"""Store paths given by users: local (or mounted) paths only, until reading cloud stores exists.

``pathlib`` turns ``gs://bucket/era5.zarr`` into ``gs:/bucket/era5.zarr``, so a URL used to end in "data store
gs:/bucket/era5.zarr does not exist" (or, for an output, in a local folder named ``gs:``). Every option that takes
a store path checks it here first and says plainly that URLs are not supported yet.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://``, ``s3://``, ``https://``, ``file://``, ...) rather than a local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def local_path(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a local :class:`~pathlib.Path`; a URL raises ``ValueError`` naming ``option`` (e.g. ``--data-path``)."""
    if is_url(path):
        scheme = _URL.match(str(path)).group(1)
        raise ValueError(
            f"{option} {path}: URLs ({scheme}://...) are not supported yet; copy the store to a local disk "
            "(or mount the bucket, e.g. with gcsfuse or s3fs) and pass its local path"
        )
    return Path(path)
