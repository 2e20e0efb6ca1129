"""The documentation is true: its links resolve, the paths it names exist, its marked commands run.

What is checked, in ``README.md`` and ``docs/*.md``:

- every relative link ``[text](target)`` points to a file of the repository, and ``target#anchor`` to
  a heading of that file (``#anchor`` alone: a heading of the same file), with GitHub's heading ids;
- every repository path the text names — ``examples/…``, ``tests/…``, ``sharedstate/…``, ``docs/…``,
  ``.ci/…``, in inline code or in a code block — exists, and so does every bare file name written in
  inline code (``*.py``, ``*.md``, ``*.toml``, ``*.json`` …), so no page names a module or a page that
  is not there, such as an ``API.md``. ``USER_FILES`` lists the few names that stand for a user's own
  files (``state.json``);
- every shell snippet marked runnable runs as written and exits with status 0.

Markers: an HTML comment alone on the line right before a ```` ```sh ```` (or ```` ```bash ````) fence,
both indented alike inside a list item.

- ``<!-- runnable -->``: run in a fresh temporary folder (for snippets that make their own files);
- ``<!-- runnable: repo -->``: run in the repository's root (for snippets that name files of the
  repository, such as ``python examples/demo.py``); such a snippet must leave no new file there.

A snippet runs under ``bash -e`` (so every command of it must succeed), with the interpreter running the
tests first on ``PATH`` (its ``python``, ``pip`` and ``sharedstate``), no ``SHAREDSTATE_*`` variables
inherited, ``TMPDIR`` set to a temporary folder removed afterwards, in a session of its own that is
killed after ``SNIPPET_TIMEOUT_S``. Mark only what runs offline in a few seconds: no ``pip install``, no
server that runs until it is stopped.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: A runnable snippet is killed (and fails) after this long; marked snippets take a few seconds.
SNIPPET_TIMEOUT_S = 60.0

#: Names in backticks that stand for a user's own files (a snapshot it names), not files of this repository.
USER_FILES = frozenset({"state.json", "hits.json"})


_MARKER = re.compile(r"^\s*<!--\s*runnable(?::\s*(\w+))?\s*-->\s*$")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_REPO_PATH = re.compile(r"(?<![\w./~$-])(?:examples|tests|sharedstate|docs|\.ci)/[\w./*-]*")
_BARE_FILE = re.compile(r"^[\w.-]+\.(?:py|md|toml|cfg|ini|json|txt|sh|ya?ml)$")


def _fenced_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """``(line number, language, body, marker)`` of each fenced code block; ``marker`` is the word of a
    ``runnable`` comment on the line before the fence (``""`` for a plain ``<!-- runnable -->``)."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, language = opening.group(1), opening.group(2)
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        body = []
        j = i + 1
        while j < len(lines) and not lines[j].lstrip().startswith(fence):
            body.append(lines[j])
            j += 1
        # A block inside a list item is indented: the snippet is its text without that indentation.
        code = textwrap.dedent("\n".join(body)) + "\n"
        blocks.append((i + 1, language, code, None if marker is None else marker.group(1) or ""))
        i = j + 1
    return blocks


def _prose(text: str) -> str:
    """The text outside fenced code blocks (fences blanked out, so line numbers stay)."""
    out, fence = [], None
    for line in text.splitlines():
        opening = _FENCE.match(line)
        if fence is None and opening is not None:
            fence = opening.group(1)
            out.append("")
        elif fence is not None:
            if line.lstrip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def _anchors(page: Path) -> set[str]:
    """The ids GitHub gives the headings of ``page`` (lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` … for repeats)."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        title = re.sub(r"`|\*\*|\*|_(?=\W)|(?<=\W)_|\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))
        slug = "".join(c for c in title.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
        slug = slug.replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _where(page: Path, text: str, index: int) -> str:
    return f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, index) + 1}"


def test_pages_exist():
    assert (ROOT / "README.md").is_file() and len(PAGES) > 10, PAGES
    assert (ROOT / "LICENSE").is_file()


def test_readme_is_a_front_door():
    """At most about 12 KB: what it is, the quick start, one example per use, links into docs/."""
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 12 * 1024, f"README.md is {size} bytes: move the manual's parts into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path):
    text = _prose(page.read_text(encoding="utf-8"))
    broken = []
    for match in _LINK.finditer(text):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = page if not path_part else (page.parent / path_part).resolve()
        if not linked.exists():
            broken.append(f"{_where(page, text, match.start())}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{_where(page, text, match.start())}: {target} (no heading #{anchor})")
        elif ROOT not in linked.parents and linked != ROOT:
            broken.append(f"{_where(page, text, match.start())}: {target} (outside the repository)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _named_paths(page: Path) -> list[tuple[str, str]]:
    """``(where, path)`` of every repository path and bare file name ``page`` names."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _REPO_PATH.finditer(text):
        found.append((_where(page, text, match.start()), match.group(0).rstrip(".,:;")))
    prose = _prose(text)
    for match in _INLINE_CODE.finditer(prose):
        code = match.group(2).strip()
        if _BARE_FILE.match(code):
            found.append((_where(page, prose, match.start()), code))
    return found


@functools.cache
def _file_names() -> frozenset[str]:
    """The names of the repository's own files: not in hidden folders (``.git``, ``.venv``), virtual
    environments, caches or build output, whose modules would make any ``base.py`` "exist"."""
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d not in ("__pycache__", "build", "dist")
            and not d.endswith(".egg-info")
            and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))
        ]
        names.update(files)
    return frozenset(names)


def _exists(path: str) -> bool:
    if "/" not in path:  # a bare file name: some file of that name in the repository
        return path in _file_names()
    if "*" in path:
        return any(ROOT.glob(path))
    return (ROOT / path).exists() and (not path.endswith("/") or (ROOT / path).is_dir())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_exist(page: Path):
    missing = [f"{where}: {path}" for where, path in _named_paths(page) if path not in USER_FILES and not _exists(path)]
    assert not missing, "the docs name files the repository does not have:\n" + "\n".join(missing)


def test_no_page_names_a_missing_api_md():
    """The contract lives in docs/reference.md; no page sends readers to a file that is not there."""
    for page in PAGES:
        if "API.md" in page.read_text(encoding="utf-8"):
            assert (ROOT / "API.md").exists() or (ROOT / "docs" / "API.md").exists(), f"{page} names API.md"


def _snippets() -> list[tuple[str, str, str]]:
    snippets = []
    for page in PAGES:
        for line, language, body, marker in _fenced_blocks(page.read_text(encoding="utf-8")):
            if marker is not None:
                snippets.append((f"{page.relative_to(ROOT)}:{line}", language, body, marker))
    return snippets


SNIPPETS = _snippets()


def test_markers_are_known():
    """A marker must sit right above a shell fence and say where it runs: a typo must not make a snippet
    silently untested."""
    bad = [f"{where}: ```{language} marked {marker!r}" for where, language, _, marker in SNIPPETS
           if language not in ("sh", "bash") or marker not in ("", "repo")]  # fmt: skip
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if "runnable" in line and line.lstrip().startswith("<!--"):
                following = lines[i + 1] if i + 1 < len(lines) else ""
                if not _MARKER.match(line) or not _FENCE.match(following):
                    bad.append(f"{page.relative_to(ROOT)}:{i + 1}: {line.strip()} is not right above a fence")
    assert not bad, "\n".join(bad)
    assert len(SNIPPETS) >= 5, "the docs should mark their runnable commands"


def _top_level() -> set[str]:
    return set(os.listdir(ROOT))


def run_snippet(
    where: str, body: str, cwd: Path, bin_dir: str | None = None, timeout: float = SNIPPET_TIMEOUT_S
) -> str:
    """Run a shell snippet as the module's docstring says (``bin_dir``: first on ``PATH``, by default the
    folder of the interpreter running the tests); fail the test unless it exits 0. Returns its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PATH"] = (bin_dir or os.path.dirname(sys.executable)) + os.pathsep + env.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix="sharedstate-docs-") as folder:
        env["TMPDIR"] = folder  # what the snippet makes with mktemp (and its servers' folders) goes too
        proc = subprocess.Popen(
            ["bash", "-e", "-c", body],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the snippet's servers and children die with it on a timeout
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"{where} did not finish within {timeout:g} s:\n{output}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 0, f"{where} exited with status {proc.returncode}:\n{body}\n--- output:\n{output}"
        return output


@pytest.mark.parametrize(("where", "language", "body", "marker"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_runnable_snippet(where: str, language: str, body: str, marker: str):
    with tempfile.TemporaryDirectory(prefix="sharedstate-docs-") as folder:
        before = _top_level()
        run_snippet(where, body, ROOT if marker == "repo" else Path(folder))
        left = _top_level() - before
        assert not left, f"{where} left {sorted(left)} in the repository"
