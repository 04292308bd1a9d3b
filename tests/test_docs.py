"""The documentation works: every command block marked runnable in README.md and docs/ runs, and every relative link resolves.

A block is marked by a line ``<!-- runnable -->`` (or ``<!-- runnable slow -->``) right before its
```` ```bash ```` fence. Each marked block runs as one bash script in an empty project folder of its
own (``GIGASEG_ROOT`` and the working folder, an SQLite MLflow store inside it), with this
environment's commands first on PATH, so it shows what a newcomer who copies it gets.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The pages whose command blocks can be marked runnable.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: The pages whose links are checked.
LINKED_PAGES = [*PAGES, ROOT / "benchmarks" / "README.md"]

MARKER = re.compile(r"^<!--\s*runnable(?:\s+(slow))?\s*-->\s*$")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*(\S*)")
#: What a command a reader must fill in looks like: <run id>, /path/to/slide.svs, ...
PLACEHOLDER = re.compile(r"<[a-z][a-z -]*>|/path/to/|\.\.\./")
#: Seconds one block may take.
TIMEOUT = {"fast": 300, "slow": 1200}


def shown(path: Path) -> str:
    """A page's path as messages give it: relative to the repository when it is in it."""
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, from 1
    speed: str  # "fast" or "slow"
    script: str

    @property
    def name(self) -> str:
        return f"{shown(self.page)}:{self.line}"


def fenced_blocks(lines: list[str]) -> list[tuple[int, int, str]]:
    """(opening line index, closing line index, info string) of every top-level fenced block."""
    blocks, open_at, fence, info = [], None, "", ""
    for i, line in enumerate(lines):
        match = FENCE.match(line)
        if open_at is None and match:
            open_at, fence, info = i, match.group(1), match.group(2)
        elif open_at is not None and line.strip().startswith(fence) and line.strip() == fence[0] * len(line.strip()):
            blocks.append((open_at, i, info))
            open_at = None
    if open_at is not None:
        raise AssertionError(f"a code fence opened at line {open_at + 1} is never closed")
    return blocks


def runnable_blocks(page: Path) -> list[Block]:
    """The marked blocks of a page; a marker that is not right before a bash fence is an error."""
    lines = page.read_text(encoding="utf-8").splitlines()
    fences = {start: (end, info) for start, end, info in fenced_blocks(lines)}
    found = []
    for i, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        where = f"{shown(page)}:{i + 1}"
        assert i + 1 in fences, f"{where}: the runnable marker must be the line right before a ```bash fence"
        end, info = fences[i + 1]
        assert info in ("bash", "sh", "shell"), f"{where}: a runnable block must be bash, not {info or 'untyped'}"
        found.append(Block(page, i + 2, match.group(1) or "fast", "\n".join(lines[i + 2 : end]) + "\n"))
    return found


BLOCKS = [block for page in PAGES for block in runnable_blocks(page)]


def params(speed: str) -> list:
    return [pytest.param(b, id=b.name, marks=[pytest.mark.slow] if speed == "slow" else [])
            for b in BLOCKS if b.speed == speed]


def run_block(block: Block, folder: Path) -> None:
    """Run a block as a bash script in ``folder``, an empty project of its own; fail with its output's tail."""
    folder.mkdir()
    env = {
        **os.environ,
        "GIGASEG_ROOT": str(folder),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    env.pop("MLFLOW_RUN_ID", None)  # never adopt a run of an outer `mlflow run`
    start = time.monotonic()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.script], check=False, cwd=folder, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT[block.speed])
    seconds = time.monotonic() - start
    # Progress bars redraw with carriage returns: keep what each line ended as, and no bars.
    lines = [line.rsplit("\r", 1)[-1] for line in (done.stdout + done.stderr).splitlines()]
    tail = "\n".join([line for line in lines if line.strip() and "%|" not in line][-30:])
    assert done.returncode == 0, f"{block.name} exited with {done.returncode} after {seconds:.0f} s:\n{block.script}\n{tail}"


@pytest.mark.parametrize("block", params("fast"))
def test_runnable_block(block, tmp_path):
    run_block(block, tmp_path / "project")


@pytest.mark.parametrize("block", params("slow"))
def test_runnable_block_slow(block, tmp_path):
    run_block(block, tmp_path / "project")


def test_runnable_blocks_are_found_and_need_no_placeholders():
    assert any(b.page == ROOT / "README.md" for b in BLOCKS), "the README marks no runnable block"
    for block in BLOCKS:
        assert not PLACEHOLDER.search(block.script), f"{block.name}: a runnable block holds a placeholder"


def test_a_marker_away_from_a_bash_fence_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- runnable -->\n\n```bash\ntrue\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="right before a ```bash fence"):
        runnable_blocks(page)
    page.write_text("<!-- runnable slow -->\n```python\nprint(1)\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="must be bash"):
        runnable_blocks(page)
    page.write_text("<!-- runnable slow -->\n```bash\necho one\necho two\n```\n", encoding="utf-8")
    (block,) = runnable_blocks(page)
    assert (block.speed, block.line, block.script) == ("slow", 2, "echo one\necho two\n")


# ------------------------------------------------------------------------------ links

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> str:
    """The page without its fenced blocks and inline code, where links are not links."""
    lines = text.splitlines()
    for start, end, _ in reversed(fenced_blocks(lines)):
        lines[start : end + 1] = [""] * (end + 1 - start)
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page, as GitHub makes them."""
    lines = page.read_text(encoding="utf-8").splitlines()
    inside = {i for start, end, _ in fenced_blocks(lines) for i in range(start, end + 1)}
    seen: dict[str, int] = {}
    found = set()
    for i, line in enumerate(lines):
        match = HEADING.match(line)
        if i in inside or not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))
        slug = re.sub(r"[^\w\- ]", "", text.lower().replace("`", "")).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]  # http:, https:, mailto: ...


@pytest.mark.parametrize("page", LINKED_PAGES, ids=shown)
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
        elif ROOT not in resolved.parents and resolved != ROOT:
            broken.append(f"{target}: outside the repository")
    assert not broken, f"{shown(page)}: " + "; ".join(broken)


def test_the_link_checker_sees_links_and_headings(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `code` title: here\n\n## Twice\n\n## Twice\n\nSee [x](other.md#a-code-title-here), "
                    "![img](pics/a.png), [web](https://example.org), `[not](a-link.md)`.\n\n"
                    "```bash\necho [not](either.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["other.md#a-code-title-here", "pics/a.png"]
    assert anchors(page) == {"a-code-title-here", "twice", "twice-1"}
