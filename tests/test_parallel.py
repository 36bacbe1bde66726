"""Tensor and expert parallelism: the adapter on a model transformers sharded, against one device.

Each case starts tests/parallel_worker.py on 2 ranks with torchrun (gloo on the CPU, NCCL on two
GPUs) and asserts, float32, on what the ranks measured: logits, adapter gradients and the adapter
after 3 AdamW steps within rel 1e-5 of one device, replicated factors bit-identical on every rank
(at creation, with each rank seeded differently, and after training), greedy generate's tokens
equal, and the adapter saved from the sharded model: one file of the whole trained tensors, giving
the sharded model's logits on one device. "fsdp_config" is data parallel (each rank half the batch).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ["tp", "tp_config", "tp_experts", "ep", "ep_all_reduce", "fsdp_config"]


def run_ranks(mode: str, base_path: str, out: Path, gpus: bool, ranks: int = 2) -> list[dict]:
    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(ROOT / "tests" / "parallel_worker.py"), mode, base_path, str(out)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks) if (out / f"rank{r}.json").exists()]
    errors = [r["error"] for r in results if "error" in r]
    assert done.returncode == 0 and not errors, errors or done.stderr[-4000:]
    return results


def check(results: list[dict], ranks: int = 2) -> None:
    assert len(results) == ranks
    for r in results:
        print(r["mode"], "transformers", r["transformers"], {k: v for k, v in r.items() if k.endswith(("rel", "spread"))})
        if r["mode"] == "fsdp_config":  # data parallel: factors replicated, batches split
            assert not r["sharded_factors"]
        else:
            assert r["sharded_factors"], "some factors must actually be split over the ranks"
        assert r["bf16_factor_dtypes"] == ["torch.float32/torch.float32"]  # declared and local dtype
        assert r["bf16_replica_spread"] == 0.0
        assert r["created_replica_spread"] == 0.0  # ranks seeded differently, creation aligned them
        assert r["base_only_logits_rel"] <= 1e-5
        assert r["logits_rel"] <= 1e-5
        assert r["grad_keys_equal"] and r["grad_rel"] <= 1e-5
        assert r["moved_rel"] > 1e-3  # training really changed every factor
        assert r["trained_rel"] <= 1e-5
        assert r["trained_replica_spread"] == 0.0  # replicas bit-identical after 3 steps
        assert r["generate_equal"]
    # one file of whole tensors, exactly the trained factors, giving the sharded model's logits on one device
    assert results[0]["saved_keys_equal"] and results[0]["saved_max_abs_diff"] == 0.0
    assert results[0]["reloaded_logits_rel"] <= 1e-5


def skip_unless_available(mode: str) -> None:
    from transformers.distributed import DistributedConfig

    if mode == "ep_all_reduce" and "ep_implementation" not in DistributedConfig.__dataclass_fields__:
        pytest.skip("DistributedConfig(ep_implementation=...) is transformers >= 5.24")


@pytest.mark.parametrize("mode", MODES)
def test_parallel_on_two_cpu_processes(mode, qwen3_path, tmp_path):
    skip_unless_available(mode)
    check(run_ranks(mode, qwen3_path, tmp_path, gpus=False))


def test_tp_times_fsdp_on_four_cpu_processes(qwen3_path, tmp_path):
    """DistributedConfig(tp_size=2, fsdp_size=2): a 2D (fsdp, tp) mesh; each TP pair trains on half the batch."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.21"):
        pytest.skip(f"transformers {transformers.__version__} builds tp_size x fsdp_size on a 1D mesh and fails in its "
                    f"own loading (seen with 5.17); the (fsdp, tp) mesh is transformers >= 5.21")
    check(run_ranks("tp_fsdp", qwen3_path, tmp_path, gpus=False, ranks=4), ranks=4)


def test_expert_parallel_with_fsdp_on_two_cpu_processes(qwen3_path, tmp_path):
    """DistributedConfig(fsdp_size=2, ep_size=2): experts on a 2D (efsdp, ep) mesh exchanging tokens of two
    batches; each rank trains on its own half of the batch, and the adapter is one device's on the whole."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.21"):
        pytest.skip(f"transformers {transformers.__version__} has no ep_size (expert parallel with FSDP is >= 5.21)")
    check(run_ranks("ep_fsdp", qwen3_path, tmp_path, gpus=False))


def test_unfollowable_layouts_are_refused(qwen3_path, tmp_path):
    for r in run_ranks("refusals", qwen3_path, tmp_path, gpus=False):
        assert "split unevenly along dim 1" in r["uneven"] and "divide by 2" in r["uneven"]
        assert "lora_dropout=0.1" in r["dropout"] and "column-parallel" in r["dropout"]
        if "dropout_whole" in r:  # transformers 5.17: expert parallel, attention whole on every rank
            assert "lora_dropout=0.1" in r["dropout_whole"] and "same batch" in r["dropout_whole"]
        assert all(v for k, v in r.items() if k.endswith("_untouched"))


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("mode", MODES)
def test_parallel_on_two_gpus(mode, qwen3_path, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    skip_unless_available(mode)
    check(run_ranks(mode, qwen3_path, tmp_path, gpus=True))


def test_example_trains_tensor_parallel(tmp_path):
    """examples/train_distributed.py --parallel tp: 2 gloo ranks write one whole adapter that loads on one device."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "adapter"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port), str(ROOT / "examples" / "train_distributed.py"),
               "--parallel", "tp", "--max-steps", "3", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    saved = load_file(out / "adapter_model.safetensors")
    assert report["adapter_keys"] == len(saved) and report["world_size"] == 2
    base = AutoModelForCausalLM.from_pretrained(ROOT / "examples" / "tiny-qwen3-moe", local_files_only=True)
    model = PeftModel.from_pretrained(base, out)  # whole tensors, which the loader checks against the model
    experts = [k for k in saved if k.endswith("experts.w1.lora_B.weight")]
    assert experts and all(saved[k].abs().sum() > 0 for k in experts)  # trained away from B = 0
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 5, 7, 9]])).logits).all()
