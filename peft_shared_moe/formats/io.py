"""Reading adapter directories safely, and writing them atomically and one tensor at a time.

Nothing from an adapter directory is ever executed: the config is parsed as JSON, weights are
safetensors, and a pickled `adapter_model.bin` is read only when the caller opts in, and then
with `torch.load(weights_only=True)`, which refuses arbitrary Python objects.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# safetensors dtype names <-> torch dtypes; adapters are floating point, fp8 is not a LoRA format.
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class AdapterFormatError(ValueError):
    """Bad adapter input; the message names the offending file, key or shape and what was expected."""


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


Index = Optional[tuple[slice, ...]]


class SafetensorsReader:
    """Shapes and dtypes from the header; data one tensor (or one slice) at a time via `safe_open`.

    `safe_open` memory-maps the file, and every page read stays resident (and counts in RSS)
    until the file is closed. `session()` keeps the file open for a group of reads and closes it
    after, so peak memory is one group's tensors, not the whole adapter.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None
        try:
            with safe_open(str(path), framework="pt") as handle:
                self.meta = {key: self._meta(key, handle.get_slice(key)) for key in handle.keys()}
        except AdapterFormatError:
            raise
        except Exception as err:  # the Rust reader raises its own error types for broken headers
            raise AdapterFormatError(f"{path}: not a readable safetensors file ({err})") from err

    @staticmethod
    def _meta(key: str, view) -> TensorMeta:
        name = view.get_dtype()
        if name not in DTYPES:
            raise AdapterFormatError(f"{key}: dtype {name} is not supported (expected one of {sorted(DTYPES)})")
        return TensorMeta(tuple(view.get_shape()), DTYPES[name])

    @contextmanager
    def session(self) -> Iterator[None]:
        if self._handle is not None:  # nested: the outer session keeps the file open
            yield
            return
        with safe_open(str(self.path), framework="pt") as handle:
            self._handle = handle
            try:
                yield
            finally:
                self._handle = None

    def load(self, key: str, index: Index = None) -> torch.Tensor:
        with self.session():
            if index is None:
                return self._handle.get_tensor(key)
            return self._handle.get_slice(key)[index]


class PickleReader:
    """An opted-in `adapter_model.bin`, read whole with `torch.load(weights_only=True)` (no streaming)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for forbidden globals, others for corrupt files
            raise AdapterFormatError(f"{path}: refused by torch.load(weights_only=True): {err}") from err
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise AdapterFormatError(f"{path}: expected a dict of name -> tensor, found {type(tensors).__name__}")
        self._tensors = tensors
        self.meta = {}
        for key, tensor in tensors.items():
            if tensor.dtype not in DTYPE_NAMES:
                raise AdapterFormatError(f"{key}: dtype {tensor.dtype} is not supported (expected one of {sorted(DTYPES)})")
            self.meta[key] = TensorMeta(tuple(tensor.shape), tensor.dtype)

    @contextmanager
    def session(self) -> Iterator[None]:
        yield

    def load(self, key: str, index: Index = None) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor.clone() if index is None else tensor[index].clone()


Reader = Union[SafetensorsReader, PickleReader]


@dataclass
class AdapterFiles:
    """An adapter directory opened for reading: its parsed config and a tensor reader."""

    path: Path
    config: dict[str, Any]
    reader: Reader

    @property
    def file_bytes(self) -> int:
        return self.reader.path.stat().st_size


def open_adapter(path: PathLike, allow_pickle: bool = False) -> AdapterFiles:
    """Open `path` (a directory with adapter_config.json and adapter_model.safetensors) for reading."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"{path}: not an adapter directory (expected a directory holding {CONFIG_NAME})")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFormatError(f"{path}: no {CONFIG_NAME} (found {sorted(os.listdir(path))})")
    config = read_json_object(config_path)
    if (path / SAFETENSORS_NAME).is_file():
        reader: Reader = SafetensorsReader(path / SAFETENSORS_NAME)
    elif (path / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise AdapterFormatError(
                f"{path / PICKLE_NAME}: a pickle file, refused. Pickles can run code when loaded; convert it to "
                f"safetensors, or opt in with allow_pickle=True (--allow-pickle) to read it with "
                f"torch.load(weights_only=True)"
            )
        reader = PickleReader(path / PICKLE_NAME)
    else:
        raise AdapterFormatError(f"{path}: no {SAFETENSORS_NAME} (found {sorted(os.listdir(path))})")
    return AdapterFiles(path, config, reader)


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse `path` as one JSON object; anything else is an `AdapterFormatError` naming the file.

    ValueError covers bad syntax, bad UTF-8 and numbers too long to convert; RecursionError is what
    the parser raises on deeply nested arrays, which is bad input, not a fault of ours.
    """
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise AdapterFormatError(f"{path}: not valid JSON ({type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class SafetensorsStreamWriter:
    """Writes one safetensors file tensor by tensor, so it never holds more than one tensor.

    The header (names, dtypes, shapes, byte offsets) is written first from `specs`; `write` must
    then be called once per spec, in order, inside a `with` block. Readers (safetensors, PEFT, SGLang, vLLM) cannot tell
    the result from `safetensors.torch.save_file`'s.
    """

    def __init__(self, path: Path, specs: Sequence[tuple[str, TensorMeta]], metadata: Optional[dict] = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, meta in specs:
            if name in header:
                raise RuntimeError(f"duplicate output tensor {name}")
            header[name] = {"dtype": DTYPE_NAMES[meta.dtype], "shape": list(meta.shape), "data_offsets": [offset, offset + meta.nbytes]}
            offset += meta.nbytes
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._pending = iter(list(specs))
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self._pending, None)
        if expected is None or expected[0] != name or expected[1] != TensorMeta(tuple(tensor.shape), tensor.dtype):
            raise RuntimeError(f"writing {name} {list(tensor.shape)} {tensor.dtype}, but the header expects {expected}")
        self._file.write(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._file.close()
        missing = next(self._pending, None)
        if exc_type is None and missing is not None:
            raise RuntimeError(f"safetensors file closed before {missing[0]} was written")


# Work in progress beside a destination DEST is named `.DEST.peft-shared-moe-tmp-<pid>-<host>-<random>`
# (the output being written) or `...-old-...` (a replaced output, moved aside until the new one is in
# place), so a run that was killed leaves something a person recognises, and the next run into DEST on
# the same host removes it once its process is gone.
WORK_MARK = ".peft-shared-moe-"


def _identity(path: PathLike) -> Optional[tuple[int, int]]:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _is_or_inside(path: Path, other: Path) -> bool:
    """`path` is `other` or lies inside it, by resolved name or by file identity (hard links, bind mounts)."""
    if path == other or other in path.parents:
        return True
    target = _identity(other)
    return target is not None and any(_identity(p) == target for p in (path, *path.parents))


def _input_paths(given: PathLike) -> list[Path]:
    """An input and, for a directory, the files directly in it: they may be links to files elsewhere
    (a model in the Hugging Face cache is a folder of links), and those must be protected too."""
    path = Path(given)
    paths = [path]
    if path.is_dir():
        try:
            paths += [entry for entry in path.iterdir() if entry.is_file()]
        except OSError:
            pass
    return paths


def check_destination(dst: PathLike, overwrite: bool, inputs: Iterable[PathLike] = ()) -> Path:
    """The resolved destination, after refusing one that would lose data; call it before any work.

    Refused, `overwrite` or not: a destination that is, contains or lies inside an input (the
    directories and files read, however spelled: links, `..`, trailing slashes, hard links), and
    an existing destination that is not a directory. An existing directory is replaced only with
    `overwrite`.
    """
    real = Path(os.path.realpath(dst))
    clashes = []  # (relation, input as given, input resolved); "is" names the input most exactly
    for given in inputs:
        for path in _input_paths(given):
            source = Path(os.path.realpath(path))
            inside, contains = _is_or_inside(real, source), _is_or_inside(source, real)
            if inside or contains:
                clashes.append(("is" if inside and contains else "lies inside" if inside else "contains", path, source))
    if clashes:
        relation, path, source = min(clashes, key=lambda clash: ("is", "lies inside", "contains").index(clash[0]))
        raise AdapterFormatError(
            f"destination {dst} ({real}) {relation} the input {path} ({source}); outputs are never written into, "
            f"over or inside an input, with or without overwrite: choose another destination"
        )
    if os.path.lexists(real):
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite=True (--force) to replace it")
        if not real.is_dir():
            raise FileExistsError(f"{dst} exists and is not a directory; overwrite=True (--force) replaces only a "
                                  f"directory (an earlier output), never a file")
    return real


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _work_path(dst: Path, kind: str) -> Path:
    """`.DEST.peft-shared-moe-{tmp|old}-<pid>-<host>-<random>`: unique per call, and saying who made it."""
    return dst.with_name(f".{dst.name}{WORK_MARK}{kind}-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # ours: possibly another thread's write in progress
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_work(dst: Path, inputs: Iterable[PathLike] = ()) -> None:
    """Remove what killed runs on this host left beside `dst` (see WORK_MARK).

    Left alone: a run still alive, one from another host (its process cannot be checked from here),
    anything that is, holds or lies inside one of this run's inputs (a user may have copied a
    leftover to read from it), and a moved-aside old output while `dst` itself is missing (the run
    died between moving it aside and putting the new one in place: it is the only copy).
    """
    stale = re.compile(rf"^\.{re.escape(dst.name)}{re.escape(WORK_MARK)}(tmp|old)-(\d+)(?:-(.+)-[0-9a-f]{{8}})?$")
    sources = [Path(os.path.realpath(p)) for given in inputs for p in _input_paths(given)]
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = stale.match(entry.name)
        if not match or match.group(3) not in (None, _HOST) or _running(int(match.group(2))):
            continue
        if match.group(1) == "old" and not os.path.lexists(dst):
            continue
        real = Path(os.path.realpath(entry))
        if any(_is_or_inside(real, source) or _is_or_inside(source, real) for source in sources):
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@contextmanager
def atomic_directory(dst: PathLike, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `dst` that becomes `dst` only if the block succeeds.

    On any error the temporary directory is removed, so `dst` is either untouched or complete.
    A replaced `dst` is moved aside first and deleted only after the new one is in place.
    """
    inputs = list(inputs)
    dst = check_destination(dst, overwrite, inputs)
    remove_stale_work(dst, inputs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _work_path(dst, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        check_destination(dst, overwrite, inputs)  # something may have appeared meanwhile
        old = None
        if os.path.lexists(dst):
            old = _work_path(dst, "old")
            os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            if old is not None:
                os.rename(old, dst)
            raise
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config(directory: Path, config, name: str = CONFIG_NAME) -> None:
    """Write a PEFT config (or a plain dict) as PEFT does, with sets as sorted lists so output is stable."""
    data = config if isinstance(config, dict) else config.to_dict()
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
    (directory / name).write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
