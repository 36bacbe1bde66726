"""Reading adapter directories safely, and writing them atomically and one tensor at a time.

Nothing from an adapter directory is ever executed: the config is parsed as JSON, weights are
safetensors, and a pickled `adapter_model.bin` is read only when the caller opts in, and then
with `torch.load(weights_only=True)`, which refuses arbitrary Python objects.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import uuid
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
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
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
        raw = json.dumps(header, separators=(",", ":")).encode()
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


def check_destination(dst: PathLike, overwrite: bool, sources: Iterable[PathLike] = ()) -> Path:
    """Refuse before any work: an existing `dst` without `overwrite`, or a `dst` that is or holds a source."""
    dst = Path(dst).resolve()
    for src in sources:
        src = Path(src).resolve()
        if src == dst or dst in src.parents:
            raise AdapterFormatError(f"destination {dst} is, or contains, the source {src}; choose another directory")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--force) to replace it")
    return dst


@contextmanager
def atomic_directory(dst: PathLike, overwrite: bool = False, sources: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `dst` that becomes `dst` only if the block succeeds.

    On any error the temporary directory is removed, so `dst` is either untouched or complete.
    A replaced `dst` is moved aside first and deleted only after the new one is in place.
    """
    dst = check_destination(dst, overwrite, sources)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        check_destination(dst, overwrite)  # something may have appeared meanwhile
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            if old is not None:
                os.rename(old, dst)
            raise
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config(directory: Path, config, name: str = CONFIG_NAME) -> None:
    """Write a PEFT config (or a plain dict) as PEFT does, with sets as sorted lists so output is stable."""
    data = config if isinstance(config, dict) else config.to_dict()
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
    (directory / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
