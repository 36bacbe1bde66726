"""Serving formats: export to SGLang / Tinker / vLLM, import from them, inspect, TP shards, merge.

See docs/FORMATS.md. Every function reads one tensor at a time, validates before writing, and
writes atomically; bad input raises `AdapterFormatError` (a `ValueError`) naming keys and shapes.
"""

from .convert import (
    EXPORT_FORMATS,
    FORMATS,
    AdapterInfo,
    convert_adapter,
    export_adapter,
    import_adapter,
    inspect_adapter,
    shard_adapter,
)
from .io import AdapterFormatError
from .merge import merge_adapter

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "AdapterFormatError",
    "AdapterInfo",
    "convert_adapter",
    "export_adapter",
    "import_adapter",
    "inspect_adapter",
    "merge_adapter",
    "shard_adapter",
]
