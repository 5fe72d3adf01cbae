"""Server-side files are read only under the configured data roots (`LLAVA_QUEUE_DATA_ROOTS`).

A path a client names (a batch's question file, its image folder, an image in that folder) is
refused when it has a `..` part, when it is absolute and outside every root, or when it
resolves outside every root through a symbolic link. With no roots configured, every
server-side path is refused: clients upload their files instead.
"""

import os
from pathlib import Path, PurePosixPath


class PathRefused(ValueError):
    """A path outside the data roots (or any server-side path, with no roots); the message says why."""


def resolved_roots(roots: list[Path]) -> list[Path]:
    """The roots with their symbolic links resolved, as paths are compared against them."""
    return [Path(root).expanduser().resolve() for root in roots]


def _check_parts(path: str, what: str) -> PurePosixPath:
    if not path or "\0" in path:
        raise PathRefused(f"{what}: an empty path or one with a NUL byte is not a file name")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        # JSON's "\ud800": no file name holds a lone surrogate (those of undecodable bytes, \udc80 to \udcff, encode
        # back to them). It raised out of `resolve`, and a batch naming such an image failed as a whole with a 500.
        raise PathRefused(f"{what}: {path!r} is not a file name (it holds a lone surrogate)") from None
    parts = PurePosixPath(path)
    if ".." in parts.parts:
        raise PathRefused(f"{what}: {path!r} has a '..' part; name a path under a data root without one")
    return parts


def _under(resolved: Path, roots: list[Path]) -> bool:
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


def resolve_data_path(path: str, roots: list[Path], what: str = "path") -> Path:
    """The real path of a client-named server path, checked to lie under one of `roots`.

    An absolute path must lie under a root; a relative one is taken under each root in turn (the
    first where it exists, else the first root). Raises PathRefused with the reason.
    """
    if not roots:
        raise PathRefused(f"{what}: server-side paths are disabled (no LLAVA_QUEUE_DATA_ROOTS configured); "
                          "upload the file instead")
    parts = _check_parts(path, what)
    real_roots = resolved_roots(roots)
    try:
        if parts.is_absolute():
            candidates = [Path(path)]
        else:
            candidates = [root / parts for root in real_roots]
            candidates = [candidate for candidate in candidates if candidate.exists()] or candidates[:1]
        resolved = candidates[0].resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: pathlib's "Symlink loop from ..." (Python 3.11)
        raise PathRefused(f"{what}: {path!r} cannot be used as a path ({_why(exc)})") from None
    if not _under(resolved, real_roots):
        raise PathRefused(f"{what}: {path!r} is outside the data roots"
                          + (" (it leads there through a symbolic link)" if not parts.is_absolute()
                             or _under(Path(path).absolute(), real_roots) else ""))
    return resolved


def resolve_in_folder(folder: Path, name: str, roots: list[Path], what: str = "image") -> Path:
    """The real path of `name` inside `folder` (already resolved under the roots), checked to stay under `roots`.

    `name` must be relative, without `..`; a symbolic link that leads outside every root is refused.
    """
    parts = _check_parts(name, what)
    if parts.is_absolute():
        raise PathRefused(f"{what}: {name!r} is an absolute path; name a file relative to the image folder")
    try:
        resolved = (folder / parts).resolve()
    except (OSError, RuntimeError) as exc:
        raise PathRefused(f"{what}: {name!r} cannot be used as a path ({_why(exc)})") from None
    if not _under(resolved, resolved_roots(roots)):
        raise PathRefused(f"{what}: {name!r} leads outside the data roots (through a symbolic link)")
    return resolved


def _why(exc: OSError | RuntimeError) -> str:
    return "a loop of symbolic links" if isinstance(exc, RuntimeError) else exc.strerror
