"""Files on disk: adapter weights, config, model card, and the atomic publish of a whole adapter directory.

Runs on the writing rank only and knows nothing of ranks or sharding. `publish` builds the new directory
as a hidden sibling, fsyncs it, and swaps it into place (one atomic exchange on Linux), so readers see the
old adapter or the new one, never a mix; files in an existing directory that are not part of the adapter
are carried over by hard link, except the previous save's weights that the new ones supersede
(`superseded_weights`: in a model folder every weights file and index the new save does not write, as a stale
`model.safetensors` would load before a new index). Modes are those PEFT's own save gives: new directories
and files get the process umask's defaults (the kernel applies it), and whatever the new adapter replaces
keeps its mode, as a file overwritten in place would. Hidden siblings carry their writer's owner tag
(`shardsave.storage.owner`), so that what a writer that provably died left behind is removed later (`remove_stale`).
"""

from __future__ import annotations

import copy
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from shardsave.plan.names import path_component
from shardsave.storage.owner import Owner

__all__ = [
    "SAFETENSORS_NAME",
    "BIN_NAME",
    "CONFIG_NAME",
    "CARD_NAME",
    "TMP_MARK",
    "OLD_MARK",
    "write_weights",
    "write_config",
    "publish",
    "stage_directory",
    "write_files",
    "discard",
    "atomic_file",
    "replace_adapter_files",
    "superseded_weights",
    "check_destination",
    "check_path_argument",
    "adapter_dir",
    "remove_stale",
    "remove_stale_in",
    "BackgroundSync",
]

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
_ADAPTER_FILES = frozenset({SAFETENSORS_NAME, BIN_NAME, CONFIG_NAME})
TMP_MARK = ".shardsave-tmp-"
OLD_MARK = ".shardsave-old-"
_UNIQUE = re.compile(r"[0-9a-f]{8}")  # what follows the owner tag in a hidden name


def _hidden_name(parent: Path, prefix: str) -> Path:
    """`parent/<prefix><owner tag><8 hex digits>`: unique to this process, and removable once it is gone."""
    return parent / f"{prefix}{Owner.current().tag}{uuid.uuid4().hex[:8]}"


def _hidden(parent: Path, prefix: str, create: Callable[[Path], None]) -> Path:
    """`create` a new hidden entry (see `_hidden_name`); return its path."""
    while True:
        path = _hidden_name(parent, prefix)
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))


def _keep_mode(old: str | os.PathLike, new: str | os.PathLike) -> None:
    """Give `new` the permission bits of `old` that it replaces, where both are files or both directories."""
    try:
        before, after = os.lstat(old), os.lstat(new)
    except FileNotFoundError:
        return
    same_kind = stat.S_IFMT(before.st_mode) == stat.S_IFMT(after.st_mode)
    if same_kind and not stat.S_ISLNK(before.st_mode) and stat.S_IMODE(before.st_mode) != stat.S_IMODE(after.st_mode):
        os.chmod(new, stat.S_IMODE(before.st_mode))


def _stale(directory: Path, prefix: re.Pattern) -> list[os.DirEntry]:
    """The entries of `directory` named `prefix` + an owner tag + 8 hex digits whose owner is provably gone."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = prefix.match(entry.name)
        owner = Owner.parse(entry.name, match.end()) if match else None
        if owner and _UNIQUE.fullmatch(entry.name, owner[1]) and owner[0].gone():
            stale.append(entry)
    return stale


def remove_stale_in(directory: Path, prefix: re.Pattern) -> list[str]:
    """Remove the entries of `directory` named `prefix` + the owner tag of a process that provably no longer
    runs (what a killed writer left); return their names. Live, unknown and foreign owners' are kept."""
    removed = []
    for entry in _stale(directory, prefix):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def _sibling_prefix(dest: Path, *marks: str) -> re.Pattern:
    return re.compile(rf"{re.escape(f'.{dest.name}')}(?:{'|'.join(re.escape(mark) for mark in marks)})")


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def remove_stale(dest: Path) -> list[str]:
    """Remove the hidden siblings of `dest` that a writer left when it was killed mid-publish (its half-built
    directory, or the previous adapter it was swapping out); return their names. Only siblings are touched,
    never `dest`; and where `dest` is missing because the writer died between its two renames, the previous
    adapter it had moved aside is put back rather than removed."""
    marks = (TMP_MARK, OLD_MARK)
    if not os.path.lexists(dest):
        aside = [e for e in _stale(dest.parent, _sibling_prefix(dest, OLD_MARK)) if e.is_dir(follow_symlinks=False)]
        if aside:
            latest = max(aside, key=_mtime)
            try:
                _rename_noreplace(Path(latest.path), dest)
            except OSError:  # another process put it back, or published, first
                pass
            if not os.path.lexists(dest):  # it could not be put back: it stays where it is
                marks = (TMP_MARK,)
    return remove_stale_in(dest.parent, _sibling_prefix(dest, *marks))


def adapter_dir(root: Path, adapter_name: str) -> Path:
    """Where PEFT puts an adapter: the root for `default`, a subdirectory named after it otherwise; `ValueError`
    for a name that is not one plain path component (`names.path_component`): every adapter written goes
    through here, whatever file its name came from, so none lands outside `root`."""
    if adapter_name == "default":
        return root
    return root / path_component(adapter_name, source=root, fix="Rename the adapter; nothing was written.")


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """Identifies exact aliases (tied weights saved under two names); disjoint views of one buffer differ."""
    if t.numel() == 0:
        return None
    return (str(t.device), t.data_ptr(), t.numel() * t.element_size())


def _for_safetensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with storage of its own (safetensors refuses aliases); values unchanged."""
    seen: set[tuple[str, int]] = set()
    out = {}
    for name, t in tensors.items():
        key = _storage_key(t)
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t.contiguous()
    return out


def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BackgroundSync:
    """fsync finished files on one background thread while the caller writes the next ones, so the disk's work
    overlaps the writing instead of all coming at the end (`publish` fsyncs everything again before the rename,
    which costs little once the data is on disk). Use as a context manager: leaving it waits for every fsync
    and raises the first one's error."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shardsave-fsync")
        self._pending: list = []

    def __call__(self, path: Path) -> None:
        self._pending.append(self._pool.submit(_fsync, path))

    def __enter__(self) -> BackgroundSync:
        return self

    def __exit__(self, *exc) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _with_open_mode(path: Path, write: Callable[[], None]) -> None:
    """Run `write()`, then give `path` the mode a plain `open(path, "wb")` would have given it: the existing
    file's, or the umask's default for a new one. safetensors >= 0.8 renames a mode-0600 temporary file into
    place (safetensors#782), which would make the weights unreadable to the group whatever the umask says."""
    try:
        _new_file(path)  # the kernel applies the umask (and a default ACL) to it: no process-wide umask() call
    except FileExistsError:
        pass
    mode = stat.S_IMODE(os.stat(path).st_mode)
    write()
    if stat.S_IMODE(os.stat(path).st_mode) != mode:
        os.chmod(path, mode)


def write_weights(directory: Path, tensors: Mapping[str, torch.Tensor], *, safe: bool) -> Path:
    """`adapter_model.safetensors` (with PEFT's `{"format": "pt"}` metadata) or `adapter_model.bin`."""
    if safe:
        path = directory / SAFETENSORS_NAME
        _with_open_mode(path, lambda: save_file(_for_safetensors(tensors), str(path), metadata={"format": "pt"}))
    else:
        path = directory / BIN_NAME
        # a view into a larger buffer would drag the whole buffer into the pickle
        own = {
            k: (v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v)
            for k, v in tensors.items()
        }
        torch.save(own, str(path))
    return path


def write_config(directory: Path, config, *, base_model_name_or_path: str | None, auto_mapping: dict | None) -> Path:
    """`adapter_config.json` as PEFT writes it, from a copy: the caller's config is never modified (a shallow
    copy is enough: only top-level fields are set, and PEFT serialises through `asdict`, which copies)."""
    config = copy.copy(config)
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base_model_name_or_path
    config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)
    return directory / CONFIG_NAME


def check_path_argument(save_directory: str | os.PathLike) -> str:
    """The path as given (not resolved: the writer resolves it on its own node), or `ValueError`."""
    if not isinstance(save_directory, (str, os.PathLike)) or not os.fspath(save_directory):
        raise ValueError(f"save_directory must be a non-empty path, got {save_directory!r}.")
    return os.fsdecode(os.fspath(save_directory))


def check_destination(save_directory: str | os.PathLike) -> Path:
    """The absolute destination, or `ValueError` if it cannot hold an adapter directory."""
    check_path_argument(save_directory)
    dest = Path(os.path.abspath(os.fspath(save_directory)))
    if dest.is_symlink():
        dest = dest.resolve()
    if dest.exists() and not dest.is_dir():
        raise ValueError(
            f"Provided path ({save_directory}) should be a directory, not a file: shardsave writes an adapter "
            f"directory there. Remove the file or choose another save_directory."
        )
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


#: The weights files and indexes transformers reads from a model folder, variants (`model.fp16.safetensors`,
#: `model.safetensors.index.fp16.json`) and shards (`model-00001-of-00002.safetensors`) included.
_MODEL_WEIGHTS = re.compile(
    r"(?:model|pytorch_model)(?:\..+?)?(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
    r"|(?:model\.safetensors|pytorch_model\.bin)\.index(?:\..+?)?\.json"
)


def _is_model_folder(new: Path) -> bool:
    """The new save is a model's weights (a merged model), not an adapter: it writes them at its top level."""
    return any(_MODEL_WEIGHTS.fullmatch(name) for name in os.listdir(new))


def superseded_weights(new: Path, old_names: Iterable[str]) -> list[str]:
    """The names of the previous save's files (`old_names`, one level of the old directory) that the new save
    in `new` supersedes, to be removed rather than kept beside it.

    A model folder (see `_is_model_folder`) drops every weights file and index it does not write, and an
    adapter's files: transformers loads `model.safetensors` before `model.safetensors.index.json` and
    `pytorch_model.bin` where the safetensors are missing, and a folder with `adapter_config.json` as the base
    plus that adapter, so any of them left over would load the previous model. This is what transformers' own
    `save_pretrained` means by cleaning the folder, for every pattern rather than only its sharded files. An
    adapter folder (holding `adapter_config.json`) drops the weights file of the other format. Anything else
    (tokenizer, README, other folders) is kept."""
    if _is_model_folder(new):
        stale = lambda name: _MODEL_WEIGHTS.fullmatch(name) or name in _ADAPTER_FILES  # noqa: E731
    elif (new / CONFIG_NAME).exists():
        stale = _ADAPTER_FILES.__contains__
    else:
        return []
    return [name for name in old_names if stale(name) and not os.path.lexists(new / name)]


def _carry_over(old: Path, new: Path) -> None:
    """Bring into `new` what `old` holds and the new adapter does not replace; what it replaces keeps its mode."""
    entries = list(os.scandir(old))
    superseded = set(superseded_weights(new, [e.name for e in entries if not e.is_dir(follow_symlinks=False)]))
    for entry in entries:
        target = new / entry.name
        if entry.is_dir(follow_symlinks=False):
            if target.is_dir() and not target.is_symlink():
                _carry_over(Path(entry.path), target)
                _keep_mode(entry.path, target)  # after filling it: the kept mode may lack write permission
            elif not os.path.lexists(target):
                shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        elif os.path.lexists(target):
            _keep_mode(entry.path, target)  # replaced
        elif entry.name in superseded:
            continue  # the previous save's weights: they would load instead of the new ones
        else:
            _link_or_copy(entry.path, str(target))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                _fsync(path)
        _fsync(dirpath)


def _cwd_inside(path: Path) -> bool:
    try:
        cwd = Path(os.getcwd())
    except OSError:
        return False
    return cwd == path or path in cwd.parents


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux `renameat2(a, b, flags)`; False where the system or the filesystem does not support `flags`."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (`RENAME_EXCHANGE`); False where that is not supported."""
    return _renameat2(a, b, 2)


def _rename_noreplace(a: Path, b: Path) -> None:
    """Rename `a` to `b` unless `b` exists (`FileExistsError`); atomic where `RENAME_NOREPLACE` is supported."""
    if _renameat2(a, b, 1):
        return
    if os.path.lexists(b):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(b))
    os.rename(a, b)


def _swap_in(tmp: Path, dest: Path, later: Callable[[Callable[[], None]], None]) -> None:
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    if _rename_exchange(tmp, dest):  # `dest` is never missing; `tmp` now holds the previous adapter
        later(lambda: shutil.rmtree(tmp, ignore_errors=True))
        return
    # two renames: a writer killed between them leaves no `dest` and the previous adapter in `old`
    old = _hidden_name(dest.parent, f".{dest.name}{OLD_MARK}")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a new hidden, owner-tagged sibling of `path`, fsync it and rename it over `path`, then
    fsync the directory; on any failure the sibling is removed. The file gets the mode a plain `open` would
    give it (the umask's default for a new file; an existing file's mode is kept)."""
    tmp = _hidden(path.parent, f".{path.name}.", _new_file)
    try:
        write(tmp)
        _keep_mode(path, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _replace_in_place(tmp: Path, dest: Path) -> None:
    """Fallback when `dest` itself cannot be renamed (a mount point, or the working directory): each file
    is replaced atomically, weights last, so a crash leaves at worst a new config beside old weights."""
    files = [Path(d) / f for d, _, fs in os.walk(tmp) for f in fs]
    files.sort(key=lambda p: p.name in (SAFETENSORS_NAME, BIN_NAME) or bool(_MODEL_WEIGHTS.fullmatch(p.name)))
    model_folder = _is_model_folder(tmp)
    superseded = superseded_weights(tmp, os.listdir(dest)) if model_folder else []
    for src in files:
        target = dest / src.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)
    for name in superseded:  # after the new weights are in place: a crash in between leaves both, never neither
        if not (dest / name).is_dir():
            (dest / name).unlink(missing_ok=True)
    stale_of = {SAFETENSORS_NAME: BIN_NAME, BIN_NAME: SAFETENSORS_NAME}
    for src in files:
        if src.name in stale_of:
            (dest / src.relative_to(tmp)).with_name(stale_of[src.name]).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _now(task: Callable[[], None]) -> None:
    task()


def stage_directory(save_directory: str | os.PathLike) -> Path:
    """A new hidden sibling of `save_directory`, owner-tagged, to fill ahead of time (from another thread)
    and hand to `publish(..., staged=)`; `discard` it if the save is abandoned."""
    dest = check_destination(save_directory)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # not mkdtemp (mode 0700): the adapter's directory gets the mode PEFT's os.makedirs gives it
    return _hidden(dest.parent, f".{dest.name}{TMP_MARK}", lambda path: os.mkdir(path, 0o777))


def write_files(directory: Path, files: Mapping[str, bytes]) -> None:
    """`files` (relative path -> bytes) into `directory`, each fsynced (modes from the umask, as `open`)."""
    for relative, data in files.items():
        path = directory / relative
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        _fsync(path)


def discard(staged: Path) -> None:
    """Remove a staged directory that will not be published."""
    shutil.rmtree(staged, ignore_errors=True)


def publish(
    save_directory: str | os.PathLike,
    fill: Callable[[Path], None],
    *,
    later: Callable[[Callable[[], None]], None] = _now,
    staged: Path | None = None,
) -> Path:
    """Create or replace the adapter directory `save_directory` with what `fill(tmp)` writes into `tmp`.

    `fill` gets a hidden sibling directory: a new, empty one, or `staged` (from `stage_directory`, possibly
    holding files written ahead). On any error the sibling is removed and the destination is untouched.
    Removing the previous adapter once the new one is in place is handed to `later` (at once by default): a
    caller that others wait for can do it after telling them it is done.
    """
    dest = check_destination(save_directory)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    tmp = staged if staged is not None else stage_directory(dest)
    try:
        fill(tmp)
        if dest.is_dir():
            _carry_over(dest, tmp)
            _keep_mode(dest, tmp)
        _fsync_tree(tmp)
        if dest.is_dir() and _cwd_inside(dest):
            _replace_in_place(tmp, dest)
        else:
            try:
                _swap_in(tmp, dest, later)
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM):
                    raise
                _replace_in_place(tmp, dest)
        _fsync(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def replace_adapter_files(directory: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace, inside the existing directory `directory`, the files that `fill(tmp)` writes into `tmp`, each
    atomically; nothing else in `directory` is linked, copied, fsynced or otherwise touched.

    For directories that hold much more than the adapter (a Trainer checkpoint's optimizer and DeepSpeed
    shards), which `publish` would carry over whole. `fill` gets an empty hidden directory inside `directory`
    (same filesystem). Its files are fsynced, then renamed over their namesakes, weights last; a weights file of
    the other format beside a new one is removed. An error in `fill` leaves `directory` as it was. A reader
    sees each file old or new, never torn, but may see the new config beside the old weights for a moment:
    use `publish` where the adapter must change as a whole.
    """
    dest = check_destination(directory)
    if not dest.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            f"Cannot replace the adapter files in {dest}: it is not an existing directory. Create it first, or "
            f"publish a new adapter directory there instead",
            str(dest),
        )
    remove_stale_in(dest, re.compile(re.escape(TMP_MARK)))
    tmp = _hidden(dest, TMP_MARK, lambda path: os.mkdir(path, 0o777))
    try:
        fill(tmp)
        written = [Path(d) / f for d, _, fs in os.walk(tmp) for f in fs]
        for path in written:
            _fsync(path)
        folders = {dest} | {dest / path.parent.relative_to(tmp) for path in written}
        _replace_in_place(tmp, dest)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # the renames, made durable
            _fsync(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
