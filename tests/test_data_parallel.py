"""Data-parallel training as users launch it: examples/train_distributed.py on 2 ranks against one process.

Float32 throughout. On the CPU (gloo): DDP through `accelerate launch` with examples/accelerate/ddp.yaml
and through torchrun, checkpoint resume, FSDP2 through torch's `fully_shard` (accelerate enables FSDP
on accelerator devices only, so on a CPU the example refuses the fsdp2.yaml launch instead of quietly
running DDP), and the saves of an FSDP2-sharded adapter. On two GPUs (NCCL): the Trainer under
examples/accelerate/fsdp2.yaml, the same checks.

Each distributed run is tests/data_parallel_worker.py, which trains with the example's own
`build_trainer` and saves with its `save_adapter`; the one-process reference is the example itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging import version
from peft import PeftModel
from safetensors.torch import load_file

from peft_shared_moe.parallel import SAVE_TIMEOUT_ENV
from tests.conftest import input_ids, load
from tests.data_parallel_worker import whole_rel
from tests.parallel_worker import rel

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_distributed.py"
WORKER = ROOT / "tests" / "data_parallel_worker.py"
DDP_YAML = ROOT / "examples" / "accelerate" / "ddp.yaml"
FSDP2_YAML = ROOT / "examples" / "accelerate" / "fsdp2.yaml"
STEPS, SAVE_EVERY, PER_RANK = 4, 2, 4  # 2 ranks of 4 rows against one process of 8
TRAIN = ["--max-steps", str(STEPS), "--save-steps", str(SAVE_EVERY), "--lora-r", "8", "--seed", "3"]


def environment(gpus: bool, **extra: str) -> dict[str, str]:
    # loopback only: gloo would otherwise pick the interface the host name resolves to
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "HF_HUB_OFFLINE": "1", **extra}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def free_port() -> str:
    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", free_port(), *args]


def accelerate_launch(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_ip", "127.0.0.1", "--main_process_port", free_port(), *args]


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


def run_ranks(launch: list[str], out: Path, env: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """Start the worker's ranks; their JSON results and tensors, rank order."""
    out.mkdir(parents=True, exist_ok=True)
    done = run(launch, env)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()]
    assert done.returncode == 0 and len(results) == 2, (results, done.stderr[-4000:])
    return results, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def trainer_ranks(launch_prefix: list[str], out: Path, gpus: bool, *extra: str) -> tuple[list[dict], list[dict]]:
    args = [str(WORKER), "trainer", str(out), "--output", str(out / "run"), "--batch-size", str(PER_RANK), *TRAIN]
    return run_ranks([*launch_prefix, *args, *extra], out, environment(gpus))


def one_process(out: Path, gpus: bool, micro_batches: int, *extra: str) -> dict[str, torch.Tensor]:
    """The example as one process (one GPU, or the CPU) on the 2-rank run's global batch, as one batch
    (`micro_batches=1`) or as the ranks' two parts accumulated (2): its saved adapter."""
    env = environment(gpus, **({"CUDA_VISIBLE_DEVICES": "0"} if gpus else {}))
    batch = ["--batch-size", str(2 * PER_RANK // micro_batches), "--grad-accum", str(micro_batches)]
    done = run([sys.executable, str(EXAMPLE), "--output", str(out), *batch, *TRAIN, *extra], env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["world_size"] == 1 and report["steps"] == STEPS
    return load_file(report["adapter"])


def one_process_references(out: Path, gpus: bool) -> dict[str, dict[str, torch.Tensor]]:
    return {"whole": one_process(out / "whole", gpus, 1), "accumulated": one_process(out / "accumulated", gpus, 2)}


def same_adapter_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], gpus: bool) -> float:
    """How far adapter `a` is from `b`, for runs that do the same arithmetic: the worst factor on a CPU,
    where that arithmetic is deterministic (measured: bit-identical); the adapter as one vector on GPUs,
    whose backward kernels add with atomics in a varying order, noise that AdamW can blow up in a
    factor whose gradients are near its eps."""
    return whole_rel(a, b) if gpus else max(rel(a[k], b[k]) for k in b)


def check_trainer_ranks(results: list[dict], tensors: list[dict], references: dict, fsdp: bool, gpus: bool) -> None:
    """Both ranks trained the same adapter as one process; rank 0 saved it whole, once; it reloads exactly.

    Against one process on the same rows per step: accumulating the ranks' two micro-batches (the same
    padded batches, so the same sums) within 1e-5 (`same_adapter_rel`; measured on a CPU under DDP:
    bit-identical); one batch of all rows, the adapter as a whole within 1e-5. The one batch pads and sums differently,
    and a factor with gradients near AdamW's eps turns that float32 noise into more (a single element
    of 512 was 2e-5 off after 4 steps, exactly as much for one process accumulating: not the ranks).
    """
    for r in results:
        print({k: r[k] for k in ("rank", "distributed_type", "sharded_factors", "steps_run")})
        assert r["world"] == 2 and r["steps_run"] == list(range(1, STEPS + 1))
        assert r["fsdp"] is fsdp and (r["sharded_factors"] > 0) is fsdp  # FSDP2 really sharded the factors
    ranks = [t["adapter"] for t in tensors]
    accumulated, whole = references["accumulated"], references["whole"]
    assert ranks[0].keys() == ranks[1].keys() == accumulated.keys() == whole.keys()
    for key in accumulated:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # every rank holds the same adapter
    # training moved the adapter (B starts at zero), and the ranks moved it as one process did
    assert min(whole[k].norm().item() for k in whole if ".lora_B." in k) > 0
    same_sums = same_adapter_rel(ranks[0], accumulated, gpus)
    as_a_whole = whole_rel(ranks[0], whole)
    print(f"adapter vs one process: accumulated rel {same_sums:.3g}; one batch, whole rel {as_a_whole:.3g}")
    assert same_sums <= 1e-5 and as_a_whole <= 1e-5

    report = results[0]["report"]
    assert results[1]["report"] is None  # one writer
    path = Path(report["adapter"])
    saved = load_file(path)
    assert sorted(saved) == sorted(whole) and report["adapter_keys"] == len(saved)
    assert report["adapter_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for key, value in saved.items():  # whole tensors: exactly what every rank held
        assert torch.equal(value, ranks[0][key]), key
    assert results[0]["reloaded_logits_rel"] <= 1e-5


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    return one_process_references(tmp_path_factory.mktemp("one_process"), gpus=False)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, list[dict], list[dict]]:
    """DDP on 2 gloo processes, launched as `accelerate launch --config_file examples/accelerate/ddp.yaml`."""
    out = tmp_path_factory.mktemp("ddp")
    return (out, *trainer_ranks(accelerate_launch(DDP_YAML), out, False))


def test_ddp_through_accelerate_equals_one_process(ddp_run, references):
    _, results, tensors = ddp_run
    assert {r["distributed_type"] for r in results} == {"DistributedType.MULTI_CPU"}
    check_trainer_ranks(results, tensors, references, fsdp=False, gpus=False)


def test_ddp_with_trl_sft_trainer_equals_one_process(tmp_path):
    """TRL's SFTTrainer (`--trainer trl`) under torchrun DDP: both ranks hold the adapter of one process
    accumulating their two micro-batches, and rank 0 saves exactly that, whole."""
    pytest.importorskip("trl")
    results, tensors = trainer_ranks(torchrun(), tmp_path / "ddp", False, "--trainer", "trl")
    reference = one_process(tmp_path / "one", False, 2, "--trainer", "trl")
    ranks = [t["adapter"] for t in tensors]
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in reference)
    assert min(reference[k].norm().item() for k in reference if ".lora_B." in k) > 0
    assert same_adapter_rel(ranks[0], reference, gpus=False) <= 1e-5
    saved = load_file(results[0]["report"]["adapter"])
    assert all(torch.equal(saved[k], ranks[0][k]) for k in reference)


def check_resume(uninterrupted: Path, finished: list[dict], launch_prefix: list[str], out: Path, gpus: bool) -> None:
    """A run preempted after its checkpoint at step SAVE_EVERY, resumed: only the remaining steps run,
    from the checkpoint's adapter, and the result is the uninterrupted run's."""
    checkpoint = f"checkpoint-{SAVE_EVERY}"
    shutil.copytree(uninterrupted / "run" / checkpoint, out / "run" / checkpoint)  # all a killed job leaves
    results, tensors = trainer_ranks(launch_prefix, out, gpus, "--resume")
    for r in results:
        assert r["steps_run"] == list(range(SAVE_EVERY + 1, STEPS + 1))
    at_checkpoint = load_file(uninterrupted / "run" / checkpoint / "adapter_model.safetensors")
    for key, value in at_checkpoint.items():
        assert torch.equal(tensors[0]["first"][key], value), key  # the resumed steps start from the checkpoint
    finished_adapter = load_file(finished[0]["report"]["adapter"])
    resumed_adapter = load_file(results[0]["report"]["adapter"])
    assert resumed_adapter.keys() == finished_adapter.keys()
    worst = same_adapter_rel(resumed_adapter, finished_adapter, gpus)
    print("resumed vs uninterrupted: rel", worst)
    assert worst <= 1e-5


@pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("5.18"),
    reason="transformers < 5.18 cannot resume a multi-process CPU run: it loads the optimizer state with "
    "map_location=torch.device('cpu:0'), which torch.load refuses (fixed in 5.18)",
)
def test_ddp_resume_through_torchrun_equals_the_uninterrupted_run(ddp_run, tmp_path):
    out, results, _ = ddp_run
    check_resume(out, results, torchrun(), tmp_path, gpus=False)


def test_fsdp2_launch_on_a_cpu_is_refused_rather_than_run_as_ddp(tmp_path):
    done = run(accelerate_launch(FSDP2_YAML, str(EXAMPLE), "--output", str(tmp_path), "--max-steps", "1"),
               environment(gpus=False))
    assert done.returncode != 0
    assert "the launch asked for FSDP" in done.stderr and "MULTI_CPU" in done.stderr
    assert not list(tmp_path.glob("adapter_model.*"))


def test_fsdp2_on_cpu_equals_one_process_and_saves_one_whole_adapter(qwen3_path, tmp_path):
    timeout = 3
    results, tensors = run_ranks(torchrun(str(WORKER), "fsdp2", str(tmp_path), qwen3_path), tmp_path,
                                 environment(gpus=False, **{SAVE_TIMEOUT_ENV: str(timeout)}))
    for r in results:
        print({k: v for k, v in r.items() if k != "alone_error"})
        assert r["sharded_factors"] > 0
        assert r["moved_rel"] > 1e-3  # 3 steps moved every factor well past float32 noise
        assert r["trained_accumulated_rel"] <= 1e-5  # one process accumulating the ranks' parts (measured: 0)
        assert r["trained_whole_rel"] <= 1e-5  # one process on the whole batch, the adapter as one vector
    ranks = [t["adapter"] for t in tensors]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(ranks[0])
    for key, value in saved.items():  # whole tensors, not rank 0's shard
        assert torch.equal(value, ranks[0][key]) and torch.equal(value, ranks[1][key]), key
    reloaded = PeftModel.from_pretrained(load(qwen3_path, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        logits = reloaded(input_ids=input_ids(batch=4, length=9)).logits
    assert rel(logits, tensors[0]["reference_logits"]) <= 1e-5

    # rank 0 saving alone: refused after the timeout, naming the missing rank; no adapter written
    first = results[0]
    assert "rank(s) [1] of [0, 1] did not call it" in first["alone_error"] and SAVE_TIMEOUT_ENV in first["alone_error"]
    assert timeout <= first["alone_seconds"] < timeout + 20
    assert not {"adapter_model.safetensors", "adapter_config.json"} & set(first["alone_files"])

    # a save that skipped the gather (rank 0's local shards) is refused by the loader, by shape
    with pytest.raises(ValueError, match="expected shape"):
        PeftModel.from_pretrained(load(qwen3_path, dtype=torch.float32), tmp_path / "rank0_shards")


@pytest.mark.gpu
@pytest.mark.multigpu
def test_fsdp2_through_accelerate_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    references = one_process_references(tmp_path / "one_process", gpus=True)
    out = tmp_path / "fsdp2"
    results, tensors = trainer_ranks(accelerate_launch(FSDP2_YAML), out, True)
    assert {r["distributed_type"] for r in results} == {"DistributedType.FSDP"}
    check_trainer_ranks(results, tensors, references, fsdp=True, gpus=True)
    check_resume(out, results, accelerate_launch(FSDP2_YAML), tmp_path / "resumed", gpus=True)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_save_timeout_must_be_a_finite_positive_number(monkeypatch, value):
    from peft_shared_moe.parallel import _save_timeout

    monkeypatch.setenv(SAVE_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=f"{SAVE_TIMEOUT_ENV}='{value}'"):
        _save_timeout()
