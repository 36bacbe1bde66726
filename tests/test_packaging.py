"""What `pip install` pulls in: Triton (a GPU kernel compiler, a large wheel) only when asked for."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _requirements(text: str) -> list[str]:
    return [re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower() for line in text.splitlines() if line.strip()]


def test_triton_is_an_optional_extra_that_make_test_installs():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "triton" not in _requirements(cfg["options"]["install_requires"])
    extras = cfg["options.extras_require"]
    assert _requirements(extras["triton"]) == ["triton"]
    installs = re.findall(r'pip install[^\n]*-e "\.\[([^\]]*)\]"', (ROOT / "Makefile").read_text())
    assert installs and all("triton" in groups.split(",") for groups in installs)


def test_readme_installs_torch_for_the_cpu_before_the_package():
    """`pip install -e .` alone takes torch's CUDA build and ~3 GB of NVIDIA wheels on a CPU machine."""
    readme = (ROOT / "README.md").read_text()
    cpu_torch = readme.find("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert cpu_torch != -1 and cpu_torch < readme.find("pip install -e .", cpu_torch)


def test_ci_runs_the_readme_test_command_on_both_ends():
    """.ci/run calls `make test` (the README's command, newest transformers / PEFT) and `make test-floor`,
    and the Makefile pins the floor at transformers 5.17.0 + PEFT 0.21.0."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test\n" in ci and "make test-floor" in ci and "make test " in (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"FLOOR_SPEC \?= transformers==5\.17\.0 peft==0\.21\.0", makefile)
