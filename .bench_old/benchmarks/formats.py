"""Time and peak memory of inspect / convert / shard on a full-size Qwen3-30B-A3B adapter (CPU).

The adapter is synthetic but full size: 48 MoE layers (E=128, H=2048, I=768), r=32, float32,
shared-outer experts LoRA plus attention q/k/v/o LoRA (32 q heads, 4 kv heads, head_dim 128),
about 1.96 GB. Each run of an operation is its own subprocess, so its peak RSS (ru_maxrss) is its own;
the RSS right after imports is reported beside it, since `import torch, transformers, peft`
alone costs a few hundred MB. Round trips are checked byte for byte against the source.

    python benchmarks/formats.py [--workdir /tmp/...] [--layers 48] [--repeat 3]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

E, H, I, R = 128, 2048, 768, 32
ATTENTION = {"q_proj": (H, 32 * 128), "k_proj": (H, 4 * 128), "v_proj": (H, 4 * 128), "o_proj": (32 * 128, H)}

# name -> (operation, source adapter, destination, round trip of)
OPERATIONS = {
    "inspect": ("inspect", "native", None, None),
    "inspect --header-only": ("inspect-header", "native", None, None),
    "convert native -> sglang": ("sglang", "native", "sglang", None),
    "convert sglang -> native": ("native", "sglang", "native_from_sglang", "native"),
    "convert native -> vllm": ("vllm", "native", "vllm", None),
    "convert vllm -> native": ("native", "vllm", "native_from_vllm", "native"),
    "shard --tp 2": ("tp2", "native", "tp2", None),
    "shard --tp 4": ("tp4", "native", "tp4", None),
}


def make_adapter(path: Path, layers: int) -> None:
    """Write the synthetic native adapter tensor by tensor (never more than one in memory), in the
    order the library writes (layer by layer, modules sorted), so round trips can be compared byte for byte."""
    import torch

    from peft_shared_moe import SharedMoeLoraConfig
    from peft_shared_moe.formats.io import SAFETENSORS_NAME, SafetensorsStreamWriter, TensorMeta, write_config

    shapes = {}
    for layer in range(layers):
        p = f"base_model.model.model.layers.{layer}."
        for name, shape in {
            "w1.lora_A": (1, R, H), "w1.lora_B": (E, I, R), "w3.lora_A": (1, R, H),
            "w3.lora_B": (E, I, R), "w2.lora_A": (E, R, I), "w2.lora_B": (1, H, R),
        }.items():
            shapes[f"{p}mlp.experts.{name}.weight"] = shape
        for proj, (fan_in, fan_out) in sorted(ATTENTION.items()):
            shapes[f"{p}self_attn.{proj}.lora_A.weight"] = (R, fan_in)
            shapes[f"{p}self_attn.{proj}.lora_B.weight"] = (fan_out, R)
    path.mkdir(parents=True)
    write_config(path, SharedMoeLoraConfig(r=R, lora_alpha=32, base_model_name_or_path="Qwen/Qwen3-30B-A3B"))
    gen = torch.Generator().manual_seed(0)
    specs = [(key, TensorMeta(shape, torch.float32)) for key, shape in shapes.items()]
    with SafetensorsStreamWriter(path / SAFETENSORS_NAME, specs) as writer:
        for key, shape in shapes.items():
            writer.write(key, torch.randn(shape, generator=gen) * 0.01)


def child(operation: str, src: str, dst: str) -> None:
    """One operation in this process; prints its timing and memory as JSON."""
    from peft_shared_moe import export_adapter, import_adapter, inspect_adapter, shard_adapter

    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if operation.startswith("inspect"):
        inspect_adapter(src, read_values=operation == "inspect", progress=False)
    elif operation == "native":
        import_adapter(src, dst, progress=False)
    elif operation.startswith("tp"):
        shard_adapter(src, dst, int(operation[2:]), progress=False)
    else:
        export_adapter(src, dst, format=operation, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "rss_after_imports_mb": after_imports / 1024}))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1), "platform": platform.platform(),
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the adapters go (default: a new directory under /tmp, removed after)")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3, help="runs per operation (median, min and max reported)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="formats-bench-", dir="/tmp"))
    try:
        start = time.perf_counter()
        make_adapter(workdir / "native", args.layers)
        print(f"synthetic adapter: {_size(workdir / 'native') / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
        rows = []
        for name, (operation, src, dst, round_trip_of) in OPERATIONS.items():
            out = workdir / dst if dst else workdir / "unused"
            runs = []
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                command = [sys.executable, __file__, "--child", operation, str(workdir / src), str(out)]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode:
                    raise RuntimeError(f"{name} failed:\n{result.stderr}")
                runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
            seconds = sorted(run["seconds"] for run in runs)
            row = {
                "operation": name,
                "seconds_median": seconds[len(seconds) // 2],
                "seconds_min": seconds[0],
                "seconds_max": seconds[-1],
                "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
                "rss_after_imports_mb": max(run["rss_after_imports_mb"] for run in runs),
                "input_bytes": _size(workdir / src),
                "output_bytes": _size(out),
            }
            if round_trip_of:
                row["identical_to_source"] = filecmp.cmp(
                    out / "adapter_model.safetensors", workdir / round_trip_of / "adapter_model.safetensors", shallow=False
                )
            if round_trip_of or (dst and dst.startswith("tp")):
                shutil.rmtree(out)
            rows.append(row)
            print(json.dumps(row))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    from benchmarks.common import versions, write_result

    import safetensors

    import peft_shared_moe

    extra = {
        "machine": machine(),
        "versions": {**versions(), "safetensors": safetensors.__version__, "peft_shared_moe": peft_shared_moe.__version__},
        "adapter": {"layers": args.layers, "E": E, "H": H, "I": I, "r": R, "dtype": "float32",
                    "attention": {k: {"in": v[0], "out": v[1]} for k, v in ATTENTION.items()}},
        "notes": f"each run in its own subprocess, {args.repeat} runs per operation; inputs in the page cache "
                 f"(written just before); the machine may be shared (see load_average_at_start)",
    }
    print(f"wrote {write_result('formats', rows, extra)}")


if __name__ == "__main__":
    main()
