"""`peft-shared-moe`: inspect, convert, shard and merge shared-outer MoE LoRA adapters from the shell."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

PROG = "peft-shared-moe"
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
# The reader of our output went away (`peft-shared-moe inspect X | head -1`): end quietly with the
# status a shell reports for a tool killed by SIGPIPE, 128 + 13.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
# Errors that mean "the input or the destination is wrong", which a script can tell from a crash.
BAD_INPUT_ERRORS = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

DESCRIPTION = """\
Move shared-outer MoE LoRA adapters between training (transformers + PEFT, this library's
"native" format) and serving (SGLang, Tinker, vLLM), check them, split them for tensor
parallelism, or merge them into their base model.

Every command reads one tensor at a time, validates before writing, and writes atomically:
on an error nothing appears at the destination, and an existing destination is replaced only
with --force. Pickled adapter_model.bin files are refused unless --allow-pickle is given."""

EPILOG = """\
formats:
  native   peft_type SHARED_MOE_LORA; experts.w1|w3|w2.lora_A|lora_B.weight, 3D
           (dim 0 = 1 for shared factors); what PeftModel.save_pretrained writes
  sglang,  the same tensors under a plain PEFT LoRA config (peft_type LORA), as Tinker
  tinker   publishes them; serve with SGLang (--experts-shared-outer-loras or its
           auto-detection) or vLLM --enable-moe-shared-loras
  vllm     per-expert 2D keys experts.{e}.gate_proj|up_proj|down_proj.lora_A|lora_B.weight;
           each shared factor is copied to every expert (E times the space)
  sglang, tinker and vllm exports are for serving engines: plain PEFT (LoraConfig,
  PeftModel.from_pretrained) cannot load 3D expert factors. To load an adapter with PEFT
  and this library, or to keep training it, use native (convert --to native).

examples:
  peft-shared-moe inspect runs/adapter
  peft-shared-moe convert runs/adapter serve/sglang --to sglang
  peft-shared-moe convert tinker_download/ runs/imported --to native --base Qwen3-30B-A3B/
  peft-shared-moe shard runs/adapter runs/tp4 --tp 4
  peft-shared-moe merge --base Qwen3-30B-A3B/ --adapter runs/adapter --out runs/merged

exit codes: 0 success; 2 usage error or bad input (the message names the file, key, shape
or path); 1 any other failure; 141 the reader of the output went away (a closed pipe).
Writers never write into, over or inside an input (the adapter or the base model), with or
without --force; a killed run leaves DIR's work in .DIR.peft-shared-moe-tmp-<pid>-..., which
the next run into DIR removes."""

SHARED_CHOICES = {"auto": None, "yes": True, "no": False}


def _common(*, base: bool = True, write: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    if base:
        parent.add_argument(
            "--base", metavar="MODEL",
            help="base model config.json or model directory: check every module and shape against it",
        )
    parent.add_argument("--allow-pickle", action="store_true",
                        help="read an adapter_model.bin with torch.load(weights_only=True) (refused otherwise)")
    parent.add_argument("--no-progress", action="store_true",
                        help="no progress bars at all, transformers' included (default: ours on a terminal only)")
    if write:
        parent.add_argument("--force", action="store_true",
                            help="replace the destination if it is an existing directory (never an input, never a file)")
    return parent


def _shared_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared-outer", choices=SHARED_CHOICES, default="auto",
        help="auto: shared where the tensors declare it (dim 0 == 1) or where per-expert copies are identical "
             "in every layer; yes: require identical copies; no: store every factor per expert (default: auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect", parents=[_common(write=False)], formatter_class=formatter,
        help="recognise, validate and summarise an adapter",
        description="Print the adapter's format, rank, alpha, experts dims, sharing, layers, targets, dtypes and "
                    "size, after checking keys, shapes and (unless --header-only) that every value is finite.",
    )
    inspect.add_argument("path", help="adapter directory")
    inspect.add_argument("--json", action="store_true", help="print a JSON object instead of a summary")
    inspect.add_argument("--header-only", action="store_true",
                         help="read only the safetensors header: no finiteness check, no sharing detection")

    convert = commands.add_parser(
        "convert", parents=[_common()], formatter_class=formatter,
        help="convert between native, sglang/tinker and vllm (--to native imports)",
        description="Convert an adapter in any accepted layout (3D w1/w3/w2 or gate/up/down_proj, fused "
                    "gate_up_proj, per-expert 2D; float32/bf16/fp16) to FORMAT.",
        epilog=EPILOG.split("\n\nexamples:")[0],
    )
    convert.add_argument("src", help="adapter directory to read")
    convert.add_argument("dst", help="directory to write (must not exist unless --force; never an input or inside one)")
    convert.add_argument("--to", required=True, choices=("native", "sglang", "tinker", "vllm"), help="output format")
    _shared_option(convert)

    shard = commands.add_parser(
        "shard", parents=[_common()], formatter_class=formatter,
        help="split an adapter for N tensor-parallel ranks into DST/rank{i}/",
        description="Split by the SGLang/vLLM rule: experts gate B and up B along I, down A along I, gate A, up A "
                    "and down B replicated; q/k/v B along the output, o_proj A along the input, the rest replicated.",
    )
    shard.add_argument("src", help="adapter directory to read")
    shard.add_argument("dst", help="directory to write (never an input or inside one); it gets rank0/ ... rank{N-1}/")
    shard.add_argument("--tp", type=int, required=True, metavar="N", help="tensor-parallel size")
    shard.add_argument("--format", default="native", choices=("native", "sglang", "tinker", "vllm"),
                       help="layout of each rank's adapter (default: native)")
    _shared_option(shard)

    merge = commands.add_parser(
        "merge", parents=[_common(base=False)], formatter_class=formatter,
        help="fold an adapter into its base model and save a plain checkpoint",
        description="Load MODEL with transformers, apply the adapter (native or any importable layout), merge it "
                    "into the weights and save a checkpoint that from_pretrained loads with the adapter's logits.",
    )
    merge.add_argument("--base", required=True, metavar="MODEL", help="local base model directory")
    merge.add_argument("--adapter", required=True, help="adapter directory")
    merge.add_argument("--out", required=True, metavar="DIR",
                       help="directory for the merged checkpoint (never the base, the adapter or inside them)")
    merge.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="dtype to load and save the model in (default: the checkpoint's)")
    merge.add_argument("--allow-other-architecture", action="store_true",
                       help="merge even if the adapter records another base class than MODEL's architecture")
    return parser


def _run(args: argparse.Namespace) -> None:
    from . import formats

    progress = False if args.no_progress else None
    common = dict(allow_pickle=args.allow_pickle, progress=progress)
    if args.command == "inspect":
        info = formats.inspect_adapter(args.path, base=args.base, read_values=not args.header_only, **common)
        print(json.dumps(info.to_dict(), indent=2, allow_nan=False) if args.json else info)
    elif args.command == "convert":
        formats.convert_adapter(args.src, args.dst, args.to, shared_outer=SHARED_CHOICES[args.shared_outer],
                                base=args.base, overwrite=args.force, **common)
        print(f"{args.dst}: {args.to} adapter written")
    elif args.command == "shard":
        formats.shard_adapter(args.src, args.dst, args.tp, format=args.format, base=args.base,
                              shared_outer=SHARED_CHOICES[args.shared_outer], overwrite=args.force, **common)
        print(f"{args.dst}: {args.tp} {args.format} shards written (rank0 ... rank{args.tp - 1})")
    elif args.command == "merge":
        formats.merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.force,
                              allow_other_architecture=args.allow_other_architecture, **common)
        print(f"{args.out}: merged checkpoint written")


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Without `show`, silence the bars of transformers and huggingface_hub too (model loading and
    saving in `merge`); our own bars get progress=False. The previous settings are restored."""
    if show:
        yield
        return
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    transformers_bars, hub_bars = hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script; returns the exit code (see EPILOG)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors, 0 after --help and --version
        return int(exit_.code or 0)
    try:
        with warnings.catch_warnings(record=True) as caught, _progress_bars(not args.no_progress):
            warnings.simplefilter("always", UserWarning)
            _run(args)
        for warning in caught:
            if issubclass(warning.category, UserWarning):
                print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        _detach_stdout()
        return EXIT_BROKEN_PIPE
    except BAD_INPUT_ERRORS as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written at the destination", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the exit code is the contract, the message says what broke
        print(f"{PROG}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
