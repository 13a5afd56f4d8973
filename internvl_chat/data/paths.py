"""Where a record's media path points: joined to the dataset root as the official code joins them, and whether
it resolves outside that root (the checker warns, ``--confine_paths`` refuses, both by :func:`resolve_outside_root`).
"""

from __future__ import annotations

import os

from internvl_chat.data.errors import DataError

__all__ = ["join_media_path", "resolve_outside_root"]


def join_media_path(root: str, path: str, confine: bool = False) -> str:
    """``root`` + a media path as the official code joins them; with ``confine`` (``--confine_paths``), a path
    that resolves outside ``root`` is a bad sample (:class:`DataError` kind ``path_outside_root``)."""
    if root.startswith(("s3://", "http://", "https://")):
        return root + path  # the official string concatenation for object stores
    joined = os.path.join(root, path) if root else path
    if confine:
        outside = resolve_outside_root(root, path)
        if outside is not None:
            raise DataError(f"{path!r} resolves to {outside}, outside the dataset root {root} (--confine_paths)",
                            kind="path_outside_root")
    return joined


def resolve_outside_root(root: str, path: str) -> str | None:
    """Where the media ``path`` really is when that is outside the dataset ``root``, else None.

    Absolute paths and ``../`` escapes are resolved, symlinks followed (``os.path.realpath``), so a link inside
    ``root`` that points elsewhere counts as outside. No root (``""``: paths are taken from the working
    directory, as in the official code) and remote roots or paths have no outside. The checker warns with this,
    and ``--confine_paths`` refuses with it (:func:`join_media_path`), so both draw the line in the same place.
    """
    if not root or "://" in root or "://" in path:
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, path))
    if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
        return None
    return real
