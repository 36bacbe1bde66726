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
    assert installs and all("triton" in groups.split(",") or "triton" in _requirements(extras["dev"]) for groups in installs)
