"""Every code block of README.md runs as written.

The python, bash and console blocks run in README order in one working directory (per
test process: before a block runs, every earlier block that runs here has run there), as a
new user runs them from a fresh clone after the set-up command: ``examples/`` and
``src/`` of this checkout, and a ``.venv/bin`` whose ``python``, ``pip`` and ``millstream``
stand for the virtual environment the set-up command makes (the package is this
checkout's ``src``; nothing is installed). The set-up part of a command (``python3 -m venv
.venv && .venv/bin/pip install ... &&``) is therefore skipped and the rest runs. A block
preceded by ``<!-- requires: WHAT -->`` needs something the test cannot provide (a Kafka
broker, a Ray cluster, the network) and is skipped with that reason, except ``ui`` (run
when the dashboard's server library is installed). A failure names the block's line.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

#: one test process runs every block, in order (each block then runs once)
pytestmark = pytest.mark.xdist_group("readme")

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SRC = REPO / "src"

LANGUAGES = {"python": "python", "bash": "bash", "console": "bash", "sh": "bash"}
REQUIRES = re.compile(r"^<!--\s*requires:\s*(.+?)\s*-->$")
#: the set-up command's own part (the test's ``.venv/bin`` stands for what it makes)
SETUP = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install [^&]*&& ")


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    requires: str | None

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.language}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced python and shell blocks, with the requirement noted above each."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, language = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if language in LANGUAGES:
            prev = next((lines[k].strip() for k in range(start - 1, -1, -1)
                         if lines[k].strip()), "")
            req = REQUIRES.match(prev)
            blocks.append(Block(start + 1, LANGUAGES[language],
                                "\n".join(lines[start + 1:j]) + "\n",
                                req.group(1) if req else None))
        i = j + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def _shim(path: Path, command: str) -> None:
    path.write_text(f"#!/bin/sh\nexec {command} \"$@\"\n")
    path.chmod(0o755)


class Workdir:
    """A clone's root after the set-up command, and which blocks have run in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ran: set[int] = set()

    def run_through(self, block: Block) -> None:
        """Run the earlier runnable blocks not run here yet, then ``block``."""
        for earlier in BLOCKS:
            if earlier.line >= block.line:
                break
            if earlier.line not in self.ran and skip_reason(earlier) is None:
                self.ran.add(earlier.line)
                run_block(earlier, self.root, f" (run before line {block.line})")
        self.ran.add(block.line)
        run_block(block, self.root)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Workdir:
    """A clone's root after the set-up command (see the module docstring)."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("examples", "src", "benchmarks", "docs"):
        (root / name).symlink_to(REPO / name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    _shim(bin_dir / "python", sys.executable)
    _shim(bin_dir / "millstream", f"{sys.executable} -m millstream")
    _shim(bin_dir / "pip", "echo 'pip: not run by tests/test_readme.py' >&2; false;")
    return Workdir(root)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC)
    env.pop("MILLSTREAM_FAULT_INJECT", None)
    return env


def run_block(block: Block, cwd: Path, note: str = "") -> None:
    """Run one block in ``cwd``; fail with its README line and output when it fails."""
    if block.language == "python":
        script = cwd / f"readme_line{block.line}.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    else:
        code = "\n".join(SETUP.sub("", line) for line in block.code.splitlines())
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True,
                              timeout=600)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"README.md line {block.line}{note}: the {block.language} block did not "
                    f"end within {exc.timeout} s")
    if proc.returncode != 0:
        pytest.fail(f"README.md line {block.line}{note}: the {block.language} block failed (exit "
                    f"{proc.returncode})\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
                    f"{proc.stderr[-5000:]}", pytrace=False)


def skip_reason(block: Block) -> str | None:
    """Why a block cannot run here (None: it runs)."""
    if block.requires is None:
        return None
    if block.requires == "ui":
        if importlib.util.find_spec("aiohttp") is None:
            return "needs the ui extra (aiohttp)"
        return None
    return f"needs {block.requires}"


def test_readme_has_blocks():
    assert len(BLOCKS) >= 10
    assert BLOCKS[0].language == "bash" and SETUP.match(BLOCKS[0].code)


@pytest.mark.parametrize("block", BLOCKS[1:], ids=[b.id for b in BLOCKS[1:]])
def test_readme_block_runs(block: Block, workdir: Workdir):
    reason = skip_reason(block)
    if reason is not None:
        pytest.skip(f"README.md line {block.line}: {reason}")
    workdir.run_through(block)
