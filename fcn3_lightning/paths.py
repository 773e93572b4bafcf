"""What a store path is: a local (or mounted) path, or an fsspec URL (``https://``, ``gs://``, ``s3://``, ...) read in place.

Every option that takes a store path goes through :func:`store_location` (inputs, read-only) or :func:`local_path`
(outputs: written atomically on a local disk, so never a URL). ``pathlib`` would turn ``gs://bucket/era5.zarr`` into
``gs:/bucket/era5.zarr``; URLs are recognised here first and never become a :class:`~pathlib.Path`.

Storage options (fsspec's keyword arguments for the URL's filesystem) come from the caller (``data.storage_options``,
``--storage-options JSON``) on top of fsspec's own configuration (``FSSPEC_GCS_TOKEN=...``, ``~/.config/fsspec/``) and
of these defaults: anonymous access for ``gs://`` and ``s3://`` (the public WeatherBench2 and ARCO-ERA5 buckets need no
account; a private bucket needs ``{"token": "google_default"}`` or ``{"anon": false}``), and for ``http(s)://`` a time-out
(``timeout``, seconds; default :data:`HTTP_TIMEOUT_S`) on connecting and on every read, so that a silent server fails
instead of hanging. Opening translates the filesystems' errors (refused connection, time-out, 401/403, no Zarr metadata, a
missing filesystem package) into one-line :class:`StoreError` messages naming the option and the URL.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

#: seconds an HTTP(S) store may take to connect or to deliver the next bytes before a read fails
HTTP_TIMEOUT_S = 60.0
#: per scheme: the defaults that make the public buckets readable without an account
_ANONYMOUS = {"gs": {"token": "anon"}, "gcs": {"token": "anon"}, "s3": {"anon": True}, "s3a": {"anon": True}}
#: per scheme: the package fsspec needs for it (all in the optional extra ``[cloud]``)
_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "http": "aiohttp", "https": "aiohttp"}
#: the statistics file of a local store lies next to it
STATS_SUFFIX = ".stats.json"


class StoreError(ValueError):
    """A store that cannot be opened or read: the message names the option, the location and the cause in one line."""


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://``, ``s3://``, ``https://``, ``file://``, ...) rather than a local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def local_path(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a local :class:`~pathlib.Path` (outputs, statistics files); a URL raises :class:`StoreError` naming ``option``."""
    if is_url(path):
        raise StoreError(
            f"{option} {path}: must be a local path (outputs are written atomically on a local disk; URLs are read-only inputs "
            "here): write locally and copy, or mount the bucket (gcsfuse, s3fs) and pass its local path"
        )
    return Path(path)


@dataclass(frozen=True)
class StoreLocation:
    """A store given by a user: ``path`` (a local path or a URL, as given), the ``option`` it came from, and for a URL the
    fsspec storage options (defaults filled in)."""

    path: str
    option: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return is_url(self.path)

    @property
    def scheme(self) -> str | None:
        m = _URL.match(self.path)
        return m.group(1).lower() if m else None

    @property
    def local(self) -> Path:
        """The local path (a remote store raises)."""
        return local_path(self.path, self.option)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1] if self.remote else Path(self.path).name

    def __str__(self) -> str:
        return self.path

    def stats_sibling(self) -> Path | None:
        """``<store>.stats.json`` next to a local store; None for a remote one (nothing is written into a bucket)."""
        return None if self.remote else Path(self.path).with_name(Path(self.path).name + STATS_SUFFIX)

    def zarr_store(self) -> Any:
        """What zarr and xarray open: the local path, or a read-only :class:`zarr.storage.FsspecStore` for a URL.

        A missing filesystem package raises :class:`StoreError` saying what to install."""
        if not self.remote:
            return self.path
        import zarr.storage

        try:
            return zarr.storage.FsspecStore.from_url(self.path, storage_options=_fsspec_options(self), read_only=True)
        except ImportError as e:
            package = _PACKAGES.get(self.scheme or "", "the fsspec filesystem for it")
            raise StoreError(
                f"{self.option} {self.path}: reading {self.scheme}:// URLs needs {package} ({e}): pip install 'fcn3-lightning[cloud]'"
            ) from e
        except ValueError as e:  # fsspec: unknown protocol
            raise StoreError(f"{self.option} {self.path}: {e}") from e

    def describe(self, err: BaseException) -> str:
        """A one-line message for an error raised while opening or reading this store."""
        return f"{self.option} {self.path}: {_cause(err, self)}"


def store_location(path: str | os.PathLike | StoreLocation, option: str, storage_options: dict[str, Any] | None = None) -> StoreLocation:
    """A user's store path (local or URL) with the storage options that reading it takes; options on a local path raise."""
    if isinstance(path, StoreLocation):
        return path
    text = os.fspath(path)
    if storage_options and not is_url(text):
        raise StoreError(
            f"{option} {text}: storage options {sorted(storage_options)} are for URLs (gs://, s3://, https://), not local paths"
        )
    return StoreLocation(text, option, dict(storage_options or {}))


def open_zarr(location: StoreLocation, *, what: str | None = None, **kwargs: Any) -> Any:
    """``xarray.open_zarr`` of a local or remote store (consolidated metadata where there is some); every failure to get at it
    raises :class:`StoreError` (or ``FileNotFoundError`` for a local path that does not exist) in one line."""
    import xarray as xr

    where = f"the {what} {location.path}" if what else f"{location.option} {location.path}"
    if not location.remote and not Path(location.path).exists():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        return xr.open_zarr(location.zarr_store(), consolidated=None, decode_timedelta=True, **kwargs)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader error: name the store and the cause
        cause = _cause(e, location) if location.remote else f"not readable as a Zarr store: {e}"
        raise StoreError(f"cannot open {where}: {cause}") from e


def _fsspec_options(location: StoreLocation) -> dict[str, Any]:
    """The caller's options over fsspec's configuration for the scheme over our defaults (anonymous, time-outs)."""
    import fsspec.config

    scheme = location.scheme or ""
    configured = fsspec.config.conf.get(scheme, {})
    opts = {k: v for k, v in _ANONYMOUS.get(scheme, {}).items() if not configured.keys() & {"token", "anon", "key", "secret"}}
    opts.update(location.storage_options)
    if scheme in ("http", "https"):
        import aiohttp

        timeout = float(opts.pop("timeout", configured.get("timeout", HTTP_TIMEOUT_S)))
        client = dict(opts.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout, sock_read=timeout))
        opts["client_kwargs"] = client
    return opts


def _cause(err: BaseException, location: StoreLocation) -> str:
    """The first recognisable cause in ``err``'s chain, said plainly."""
    seen: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    for e in seen:
        status = getattr(e, "status", None) or getattr(e, "code", None)
        if isinstance(e, PermissionError) or status in (401, 403):
            how = {
                "gs": 'storage options {"token": "google_default"} (or a service-account file)',
                "s3": 'storage options {"anon": false} with AWS credentials in the environment',
            }.get((location.scheme or "").rstrip("a").replace("gcs", "gs"), "storage options carrying the credentials (e.g. headers)")
            code = f"HTTP {status}" if isinstance(status, int) else "permission denied"
            return f"access denied ({code}): the store is private or the credentials are wrong; pass {how}"
        if isinstance(e, asyncio.TimeoutError | TimeoutError):
            return f"no answer within the time-out ({_timeout_of(location)}); the server is slow or not answering"
    for e in seen:
        name = type(e).__name__
        if name in ("ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ClientOSError") or isinstance(
            e, ConnectionError
        ):
            return f"cannot reach it ({e})"
    for e in seen:
        if isinstance(e, FileNotFoundError | KeyError) or type(e).__name__ in ("GroupNotFoundError", "NodeNotFoundError"):
            return "no Zarr store there (none of zarr.json, .zmetadata, .zgroup found): check the path"
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _timeout_of(location: StoreLocation) -> str:
    t = location.storage_options.get("timeout")
    return f"{float(t):g} s" if t is not None else f"{HTTP_TIMEOUT_S:g} s, storage option 'timeout'"


def parse_storage_options(text: str) -> dict[str, Any]:
    """``--storage-options JSON`` (argparse ``type``): a JSON object of fsspec options."""
    import argparse
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}; e.g. '{{\"anon\": false}}'") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed (e.g. '{{\"anon\": false}}'), got {text!r}")
    return value
