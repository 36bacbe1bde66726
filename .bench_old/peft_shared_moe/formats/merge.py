"""`merge_adapter`: a base model with an adapter folded into its weights, saved as a plain checkpoint."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .convert import import_adapter
from .io import PathLike, atomic_directory, check_destination

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
) -> Path:
    """Load `base` (a local model directory) with `adapter` (native or any layout `import_adapter`
    accepts), merge, and save to `out` a checkpoint that `from_pretrained` loads with the adapter's logits.

    The adapter always goes through `import_adapter` with the base as reference, so a misfit is
    reported by key before the model is loaded. `dtype`: "auto" (the checkpoint's, default),
    "float32", "bfloat16" or "float16".
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = Path(base)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"base {base_dir}: expected a local model directory holding config.json")
    if dtype not in (None, "auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    parent = check_destination(out, overwrite, [base_dir, adapter]).parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merge-adapter-", dir=parent) as scratch:  # same filesystem as out
        native = import_adapter(adapter, Path(scratch) / "adapter", base=base_dir, allow_pickle=allow_pickle,
                                progress=progress)
        torch_dtype = "auto" if dtype in (None, "auto") else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype, local_files_only=True,
                                                     trust_remote_code=False)
        merged = PeftModel.from_pretrained(model, native).merge_and_unload()
        with atomic_directory(out, overwrite, [base_dir, adapter]) as tmp:
            merged.save_pretrained(tmp)
            for name in TOKENIZER_FILES:
                if (base_dir / name).is_file():
                    shutil.copy2(base_dir / name, tmp / name)
    return Path(out)
