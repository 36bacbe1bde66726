"""Writers never write into, over or inside their inputs, validate every value before the first
write, and leave recognisable temporary output when killed, which the next run cleans up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_shared_moe import export_adapter, import_adapter, shard_adapter
from peft_shared_moe.cli import main
from peft_shared_moe.formats import merge_adapter

ST, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (links followed) -> its bytes: what must be identical after a refusal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# Each writer as (name, call(src, dst, base)); all with overwrite / --force: it must never reach an input.
WRITERS = {
    "export_adapter": lambda src, dst, base: export_adapter(src, dst, overwrite=True, base=base),
    "import_adapter": lambda src, dst, base: import_adapter(src, dst, overwrite=True, base=base),
    "shard_adapter": lambda src, dst, base: shard_adapter(src, dst, 2, overwrite=True, base=base),
    "cli convert": lambda src, dst, base: main(["convert", str(src), str(dst), "--to", "vllm", "--force", "--no-progress"]
                                              + (["--base", str(base)] if base else [])),
    "cli shard": lambda src, dst, base: main(["shard", str(src), str(dst), "--tp", "2", "--force", "--no-progress"]
                                            + (["--base", str(base)] if base else [])),
}


def _refuses(writer: str, src, dst, base=None) -> None:
    if writer.startswith("cli"):
        assert WRITERS[writer](src, dst, base) == 2  # bad input
    else:
        with pytest.raises(ValueError, match="input"):
            WRITERS[writer](src, dst, base)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_destination_is_never_an_input_however_spelled(shared_native, tmp_path, writer, capsys):
    work = tmp_path / "work"
    adapter = _copy(shared_native.path, work / "A")
    (work / "link").symlink_to(adapter, target_is_directory=True)
    spellings = [
        f"{adapter}/{ST}",  # the weights file itself
        f"{adapter}/../A/{CONFIG}",  # `..`
        f"{work}/link/{ST}",  # through a symlink to the directory
        f"{adapter}/sub/out/",  # inside the adapter, with a trailing slash
        f"{work}/link/",  # the adapter itself, through the symlink
        f"{adapter}/",  # the adapter itself, trailing slash
        f"{work}",  # contains the adapter
    ]
    before, listing = snapshot(work), (sorted(os.listdir(work)), sorted(os.listdir(adapter)))
    for dst in spellings:
        _refuses(writer, adapter, dst)
        assert snapshot(work) == before, dst
        assert (sorted(os.listdir(work)), sorted(os.listdir(adapter))) == listing, dst
    if writer.startswith("cli"):
        assert "is the input" in capsys.readouterr().err


def test_inputs_reached_through_links_to_files_are_protected(shared_native, tmp_path):
    """A/adapter_model.safetensors is a link into another folder (as in the Hugging Face cache)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.copy(shared_native.path / ST, blobs / "weights")
    adapter = tmp_path / "A"
    adapter.mkdir()
    shutil.copy(shared_native.path / CONFIG, adapter / CONFIG)
    (adapter / ST).symlink_to(blobs / "weights")
    os.link(blobs / "weights", tmp_path / "hard_link")  # the same file under another name
    before = snapshot(tmp_path)
    for dst in (blobs / "weights", blobs, blobs / ".." / "blobs" / "weights", tmp_path / "hard_link"):
        with pytest.raises(ValueError, match="input"):
            export_adapter(adapter, dst, overwrite=True)
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("writer", ["export_adapter", "cli convert"])
def test_the_base_model_is_an_input_too(shared_native, qwen3_path, tmp_path, writer, capsys):
    base = Path(shutil.copytree(qwen3_path, tmp_path / "base"))
    before = snapshot(base)
    for dst in (base / "config.json", base / "out", tmp_path / "base_link" / "config.json"):
        (tmp_path / "base_link").unlink(missing_ok=True)
        (tmp_path / "base_link").symlink_to(base)
        _refuses(writer, shared_native.path, dst, base)
        assert snapshot(base) == before and sorted(os.listdir(base)) == sorted(before)


def test_merge_never_writes_over_the_base_or_the_adapter(shared_native, qwen3_path, tmp_path, capsys):
    base = Path(shutil.copytree(qwen3_path, tmp_path / "base"))
    adapter = _copy(shared_native.path, tmp_path / "A")
    before = snapshot(tmp_path)
    for out in (base / "model.safetensors", f"{base}/../base/", adapter / ST, adapter / "merged", tmp_path):
        assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--force"]) == 2
        assert "input" in capsys.readouterr().err
        assert snapshot(tmp_path) == before, out
    with pytest.raises(ValueError, match="lies inside the input"):
        merge_adapter(base, adapter, base / "merged", overwrite=True)
    assert snapshot(tmp_path) == before


def test_force_replaces_an_earlier_output_directory_but_never_a_file(shared_native, tmp_path):
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_adapter(shared_native.path, note, overwrite=True)
    assert note.read_text() == "mine"


def test_a_nan_in_a_3d_factor_is_refused_before_any_directory_is_made(shared_native, tmp_path):
    tensors = load_file(shared_native.path / ST)
    key = "base_model.model.model.layers.2.mlp.experts.w2.lora_A.weight"  # 3D [E, r, I], the last MoE layer
    assert tensors[key].dim() == 3
    tensors[key][4, 1, 3] = float("nan")
    src = tmp_path / "nan"
    src.mkdir()
    save_file(tensors, src / ST)
    shutil.copy(shared_native.path / CONFIG, src / CONFIG)
    for fmt in ("sglang", "vllm"):
        with pytest.raises(ValueError, match=f"{key}: 1 NaN/Inf"):
            export_adapter(src, tmp_path / "new" / "out", format=fmt)
        assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="NaN/Inf"):
        shard_adapter(src, tmp_path / "new" / "tp", 2)
    assert not (tmp_path / "new").exists()


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from peft_shared_moe.formats import convert

    def killed(*args, **kwargs):  # the configs are written, the tensors are not: die as a kill -9 would
        os.kill(os.getpid(), signal.SIGKILL)

    convert._stream = killed
    convert.convert_adapter(sys.argv[1], sys.argv[2], "sglang", progress=False)
    """
)


def test_a_killed_run_leaves_a_recognisable_temp_dir_that_the_next_run_removes(shared_native, tmp_path):
    dst = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", KILLED_RUN, str(shared_native.path), str(dst)], env=env,
                           capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.peft-shared-moe-tmp-"), left
    assert (tmp_path / left[0] / CONFIG).is_file() and not dst.exists()

    alive = tmp_path / f".out.peft-shared-moe-tmp-{os.getppid()}"  # a run still going (its process exists)
    alive.mkdir()
    export_adapter(shared_native.path, dst, progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, "out"])
    assert json.loads((dst / CONFIG).read_text())["peft_type"] == "LORA"
    assert torch.equal(load_file(dst / ST)["base_model.model.model.layers.0.mlp.experts.w1.lora_A.weight"],
                       shared_native.tensors["base_model.model.model.layers.0.mlp.experts.w1.lora_A.weight"])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_replaced_output_left_by_a_killed_run_is_removed_only_when_the_destination_exists(shared_native, tmp_path):
    dst = tmp_path / "out"
    aside = tmp_path / f".out.peft-shared-moe-old-{_dead_pid()}"  # the run died between its two renames
    aside.mkdir()
    (aside / "previous.txt").write_text("the only copy of the previous output")
    export_adapter(shared_native.path, dst, progress=False)
    assert (aside / "previous.txt").is_file()  # DEST was missing: kept

    export_adapter(shared_native.path, dst, overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # DEST exists: the leftover is stale


def test_a_leftover_used_as_the_input_is_not_removed_as_stale(shared_native, tmp_path):
    """A killed run's complete output, copied out of its temp dir by name, may be the next input."""
    leftover = tmp_path / f".out.peft-shared-moe-tmp-{_dead_pid()}"
    shutil.copytree(shared_native.path, leftover)
    before = {p.name: p.read_bytes() for p in leftover.iterdir()}
    export_adapter(leftover, tmp_path / "out", progress=False)
    assert {p.name: p.read_bytes() for p in leftover.iterdir()} == before
    assert (tmp_path / "out" / CONFIG).is_file()
