"""Where adapter folders may come from (issue 14): the adapter store and the extra roots.

An adapter's `source` is a path relative to the store (`Settings.adapter_store_dir`), or an
absolute path or `file://` URI inside the store or one of `Settings.adapter_roots` (volumes
every gateway and pool replica mounts). Everything is judged on real paths, with every
symlink resolved, so neither `..` nor a link inside a root can reach a file outside the
roots; the folder's two adapter files are held to the same rule (a link to /etc/shadow
named adapter_config.json is refused before it is read).

`check_inside` holds a stored path to the same rule; a loader that calls it before loading
keeps a folder swapped for a link after registration from leading the engine out of the
roots (the pool replica re-validates the files' contents, services/pools/adapter_cache.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from services.errors import InvalidAdapter, InvalidRequest
from services.pools.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFiles, check_adapter_folder


def _refused(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="source", code="invalid_adapter_source")


class AdapterSources:
    def __init__(self, store_dir: Path, roots: Sequence[Path] = ()) -> None:
        # Real paths: a root that is itself a link (e.g. /data -> /mnt/data) still matches.
        self._store = Path(os.path.realpath(store_dir))
        self._roots = [self._store, *(Path(os.path.realpath(root)) for root in roots)]

    def resolve(self, source: str) -> Path:
        """The real folder `source` names; `InvalidRequest` (400, param source) when it is
        not one, or lies outside the store and the roots."""
        if "\x00" in source:
            raise _refused("the source holds a NUL character")
        if source.startswith("file:"):
            path = _file_uri_path(source)
        elif os.path.isabs(source):
            path = PurePosixPath(source)
        else:
            path = PurePosixPath(self._store, source)
        if ".." in path.parts:
            raise _refused("the source may not contain '..'")
        return self.check_inside(Path(path))

    def check_inside(self, folder: Path) -> Path:
        """`folder`'s real path, when it and its adapter files are inside the store or a root."""
        try:
            return self._check_inside(folder)
        except OSError as exc:  # e.g. a name too long: the client's input, not our fault
            raise _refused(f"the source cannot be read as a path: {exc.strerror}") from exc

    def _check_inside(self, folder: Path) -> Path:
        real = Path(os.path.realpath(folder))
        if not self._inside(real):
            raise _refused(
                "the source is outside the adapter store and the allowed roots; put the adapter "
                "under the store (settings adapters_dir) or one of adapter_roots"
            )
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            target = real / name
            if target.is_symlink() and not self._inside(Path(os.path.realpath(target))):
                raise _refused(f"{name} is a link to a file outside the adapter store and the allowed roots")
        return real

    def _inside(self, real: Path) -> bool:
        return any(real == root or real.is_relative_to(root) for root in self._roots)


class ReplicaAdapterCheck:
    """What a pool replica runs before any engine sees an adapter: the stored folder is still
    inside the store or a root (not swapped for a link since registration), and its files
    pass `check_adapter_folder` under the deployment's size cap. Picklable: Serve ships it to
    the replica as a constructor argument."""

    def __init__(self, store_dir: Path, roots: Sequence[Path], *, max_bytes: int) -> None:
        self._store_dir = store_dir
        self._roots = list(roots)
        self._max_bytes = max_bytes

    def __call__(self, path: Path, *, base_model_path: str, max_rank: int) -> AdapterFiles:
        try:
            real = AdapterSources(self._store_dir, self._roots).check_inside(path)
        except InvalidRequest as exc:
            raise InvalidAdapter(exc.message, param="model") from None
        return check_adapter_folder(
            real, base_model_path=base_model_path, max_rank=max_rank, max_bytes=self._max_bytes
        )


def _file_uri_path(source: str) -> PurePosixPath:
    parts = urlsplit(source)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _refused("a file URI must look like file:///absolute/path (no host, query or fragment)")
    path = unquote(parts.path)
    if "\x00" in path or not path.startswith("/"):
        raise _refused("a file URI must name an absolute path")
    return PurePosixPath(path)
