"""A run's output folder: never destroys an earlier run, never writes through a link, private.

An output folder that already holds a run is refused untouched unless the run resumes it or asks to
overwrite it.

Run outputs hold updates, audit copies of what clients sent, and checkpoints. So folders are made
0700, files 0600, and no write follows a symbolic link: a link planted where an output goes (say
`metrics.jsonl -> ~/.bashrc`) makes the write fail with an error naming it, instead of truncating
the link's target. Whole-file writes are atomic (temporary file, fsync, rename): a crash leaves the
previous version.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FOLDER_MODE, FILE_MODE = 0o700, 0o600
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class UnsafeOutputError(OSError):
    """An output path is a symbolic link or not what it should be; nothing was written."""


class EarlierRunError(ValueError):
    """The output folder holds an earlier run that this one would destroy."""


# What a run writes at the top of its folder (and the first checkpoint format's file).
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "accuracy.png", "checkpoints", "model", "adapter", "run_state.pt")


def earlier_run(folder: Path) -> list[str]:
    """The run outputs already in `folder` (none: it holds no run)."""
    return [name for name in RUN_OUTPUTS if (folder / name).exists() or (folder / name).is_symlink()]


def check_output_folder(folder: Path, *, resuming: bool, overwrite: bool) -> list[str]:
    """Raise `EarlierRunError` if `folder` holds a run this one neither resumes nor may overwrite
    (nothing is touched); else the earlier outputs found."""
    found = earlier_run(folder)
    if found and not (resuming or overwrite):
        raise EarlierRunError(
            f"{folder} already holds a run ({', '.join(found)}); it is left untouched. Set resume=true to continue "
            "it, overwrite=true to replace it, or choose another output-dir")
    return found


def claim_output_folder(folder: Path, *, resuming: bool, overwrite: bool) -> Path:
    """`folder`, made private, if this run may write there: it holds no run, or this run resumes
    it, or `overwrite` asks to replace it (the earlier outputs are then deleted, nothing else)."""
    found = check_output_folder(folder, resuming=resuming, overwrite=overwrite)
    private_folder(folder)
    if found and overwrite and not resuming:
        for name in found:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return folder


def private_folder(path: Path) -> Path:
    """Create `path` (and missing parents) as 0700; an existing folder is made 0700 too. A link
    in its place is refused."""
    if path.is_symlink():
        raise UnsafeOutputError(f"{path} is a symbolic link; fedllm does not write through links (remove it)")
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    if not path.is_dir():
        raise UnsafeOutputError(f"{path} exists and is not a folder")
    os.chmod(path, FOLDER_MODE)
    return path


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | _NOFOLLOW, FILE_MODE)
    except OSError as error:
        if path.is_symlink():
            raise UnsafeOutputError(f"{path} is a symbolic link; fedllm does not write through links (remove it)") from None
        raise error


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, as a 0600 file; never through a link."""
    if path.is_symlink():
        raise UnsafeOutputError(f"{path} is a symbolic link; fedllm does not write through links (remove it)")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    descriptor = _open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)  # replaces a name, never writes into what it points to
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def append_private(path: Path, text: str) -> None:
    """Append `text` to `path` (created 0600) and fsync; never through a link."""
    descriptor = _open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(descriptor, "a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def sync_folder(path: Path) -> None:
    """fsync a folder, so a rename inside it survives a crash."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_private(root: Path) -> None:
    """Tighten a tree another library wrote (e.g. `save_pretrained`): folders 0700, files 0600.
    Links inside are removed, not followed."""
    for folder, subfolders, names in os.walk(root, followlinks=False):
        os.chmod(folder, FOLDER_MODE)
        for name in [*names, *subfolders]:
            entry = Path(folder) / name
            if entry.is_symlink():
                entry.unlink()
            elif entry.is_file():
                os.chmod(entry, FILE_MODE)
