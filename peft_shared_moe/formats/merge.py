"""`merge_adapter`: a base model with an adapter folded into its weights, saved as a plain checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from .base import check_architecture
from .convert import prepare_write, write_inputs, write_prepared
from .io import WORK_MARK, PathLike, atomic_directory, check_destination, read_json_object

# Files of the base model directory worth carrying beside the merged weights, so the output serves as is.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def merge_adapter(
    base: PathLike,
    adapter: PathLike,
    out: PathLike,
    *,
    dtype: Optional[str] = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Optional[bool] = None,
    allow_other_architecture: bool = False,
) -> Path:
    """Load `base` (a local model directory) with `adapter` (native or any layout `import_adapter`
    accepts), merge, and save to `out` a checkpoint that `from_pretrained` loads with the adapter's logits.

    The adapter always goes through the import path with the base as reference, so a misfit is
    reported by key before the model is loaded. `dtype`: "auto" (the checkpoint's, default),
    "float32", "bfloat16" or "float16". An adapter that records another base class than the base's
    architecture is refused unless `allow_other_architecture`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = Path(base)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"base {base_dir}: expected a local model directory holding config.json")
    if not any(base_dir.glob("*.safetensors")) and not any(base_dir.glob("*.bin")):
        raise FileNotFoundError(f"base {base_dir}: no weights (expected *.safetensors files, or *.bin files)")
    if dtype not in (None, "auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    inputs = write_inputs(adapter, base_dir)
    check_destination(out, overwrite, inputs)
    config_file = Path(adapter) / "adapter_config.json"
    if not allow_other_architecture and config_file.is_file():
        check_architecture(read_json_object(config_file), base_dir, str(config_file))
    # Every input is read and checked before the first write: the adapter (against the base), then the base.
    job = prepare_write(adapter, "native", base=base_dir, allow_pickle=allow_pickle, progress=progress)
    torch_dtype = "auto" if dtype in (None, "auto") else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype, local_files_only=True,
                                                 trust_remote_code=False)
    with atomic_directory(out, overwrite, inputs) as tmp:
        native = tmp / f"{WORK_MARK}adapter"  # PEFT loads from a directory; it is removed before the rename
        write_prepared(job, native, progress)
        merged = PeftModel.from_pretrained(model, native).merge_and_unload()
        shutil.rmtree(native)
        merged.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
    return Path(out)
