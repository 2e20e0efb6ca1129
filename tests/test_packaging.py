"""The package as a user gets it: built and installed from a checkout into a fresh virtual environment, and
every shell command of the README run there as written.

Once per module, the repository's files (what git tracks, and new files it does not ignore: what a clone
of the next commit has) are copied into a temporary folder, and the README's quick start runs there as
written: a ``.venv``, ``pip install .``, the demo. In that environment (first on ``PATH``, as activated)
the web section's ``pip install '.[examples]'`` runs, then each of its servers as written, asked over
HTTP and stopped (the tools' own variables move them off port 8000); ``sharedstate serve`` and ``get``;
and ``pip install '.[redis,examples]'``. A wheel built there (``pip wheel --no-deps``) carries
``py.typed``, the entry point, the classifiers and the project's URLs. pip runs as the machine configures
it (its index and find-links). Every shell command of the README is run here, run by test_docs.py (a
marked snippet), or listed in ``SKIPPED`` with the reason.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, reap
from test_docs import _fenced_blocks, run_snippet
from test_web import free_port, get, stop_group, wait_ready
from test_web_features import FLAGS_SERVER, SESSIONS_SERVER

from sharedstate.persistence.snapshot import read_snapshot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: pip may resolve and download for a while on a slow index.
INSTALL_TIMEOUT_S = 240.0

QUICK_START = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/python examples/demo.py"
INSTALL_EXAMPLES = "pip install '.[examples]'"
#: Each serves port 8000 as written: GUNICORN_CMD_ARGS and UVICORN_PORT move it to a free port here.
WEB_SERVERS = (
    "sharedstate run --path hits.json -- gunicorn -w 4 --chdir examples/web 'flask_app:create_app()'",
    "sharedstate run --path hits.json -- uvicorn --workers 3 --app-dir examples/web fastapi_app:app",
    "gunicorn -c examples/web/gunicorn.conf.py -w 4 --chdir examples/web 'flask_app:create_app()'",
)
SERVE = "sharedstate serve --address state.sock --path state.json"
GET = "sharedstate get greeting --address state.sock"

#: The README's commands this module runs as written.
RUN_HERE = frozenset({QUICK_START, INSTALL_EXAMPLES, *WEB_SERVERS, SERVE, GET})

#: The README's commands that no test runs here, and why.
SKIPPED = {
    SESSIONS_SERVER: "run as written by tests/test_web_features.py",
    FLAGS_SERVER: "run as written by tests/test_web_features.py",
    "python3 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/python -m pytest": (
        "the whole test suite, the one running now: .ci/run runs this line's steps in a fresh folder"
    ),
}

#: What the wheel's metadata must say.
CLASSIFIERS = {
    "Programming Language :: Python :: 3 :: Only",
    *(f"Programming Language :: Python :: 3.{minor}" for minor in (10, 11, 12, 13)),
    "Operating System :: POSIX :: Linux",
    "Operating System :: MacOS",
    "Typing :: Typed",
}
URLS = {"Homepage", "Documentation", "Source", "Issues", "Changelog"}
EXTRAS = {"redis", "examples", "prometheus", "test"}


def _readme_commands() -> list[tuple[str, str]]:
    """``(command, why it is not run by test_docs.py)`` of each line of the README's shell blocks that no
    runnable marker covers; a trailing comment is not part of the command."""
    commands = []
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for _, language, body, marker in _fenced_blocks(text):
        if language in ("sh", "bash") and marker is None:
            for line in body.splitlines():
                command = re.sub(r"\s+#\s.*$", "", line).strip()
                if command and not command.startswith("#"):
                    commands.append(command)
    return commands


def test_every_readme_command_is_run_here_or_skipped_with_a_reason():
    commands = set(_readme_commands())
    assert commands - RUN_HERE - SKIPPED.keys() == set(), "README commands that no test runs"
    assert (RUN_HERE | SKIPPED.keys()) - commands == set(), "commands this module runs that the README lost"


def _repository_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]  # not ones deleted


def _env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checkout")
    for name in _repository_files():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def quick_start(checkout: Path) -> str:
    """The README's first command, run in the checkout: its output."""
    return run_snippet("README quick start", QUICK_START, checkout, timeout=INSTALL_TIMEOUT_S)


@pytest.fixture(scope="module")
def venv_bin(checkout: Path, quick_start: str) -> Path:
    return checkout / ".venv" / "bin"


@pytest.fixture(scope="module")
def examples_extra(checkout: Path, venv_bin: Path) -> None:
    run_snippet("README web workers", INSTALL_EXAMPLES, checkout, str(venv_bin), timeout=INSTALL_TIMEOUT_S)


def test_the_quick_start_installs_the_package_and_runs_the_demo(quick_start: str):
    assert "hits = 4000 after the restart (was 2000)" in quick_start, quick_start


def test_version_and_entry_point_come_from_the_installed_metadata(venv_bin: Path, tmp_path: Path):
    def run(*argv: str) -> str:
        # Outside the checkout, so that its source folder does not shadow the installed package.
        done = subprocess.run(argv, cwd=tmp_path, env=_env(venv_bin), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    python = str(venv_bin / "python")
    metadata = run(python, "-c", "import importlib.metadata as m; print(m.version('sharedstate'))")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", metadata), metadata
    assert run(str(venv_bin / "sharedstate"), "--version") == f"sharedstate {metadata}"
    assert run(python, "-m", "sharedstate", "--version") == f"sharedstate {metadata}"
    version, location = run(
        python, "-c", "import sharedstate; print(sharedstate.__version__, sharedstate.__file__)"
    ).split()
    assert version == metadata and "site-packages" in location, location


def test_the_wheel_carries_py_typed_the_entry_point_and_the_metadata(checkout: Path, venv_bin: Path, tmp_path: Path):
    run_snippet("pip wheel", f"pip wheel --no-deps . -w {tmp_path}", checkout, str(venv_bin), INSTALL_TIMEOUT_S)
    (wheel,) = tmp_path.glob("sharedstate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert "sharedstate/py.typed" in names
    assert f"{dist_info}/licenses/LICENSE" in names
    assert {name.split("/")[0] for name in names} == {"sharedstate", dist_info}, "only the package is shipped"
    assert re.search(r"^sharedstate = sharedstate\._cli:main$", entry_points, re.M), entry_points
    assert CLASSIFIERS <= set(metadata.get_all("Classifier")), metadata.get_all("Classifier")
    assert any(c.startswith("Development Status :: ") for c in metadata.get_all("Classifier"))
    assert {url.split(",")[0] for url in metadata.get_all("Project-URL")} == URLS
    source = re.search(r'^SOURCE_VERSION = "(.+)"$', (ROOT / "sharedstate" / "_version.py").read_text(), re.M)
    assert metadata["Version"] == source.group(1), "the build reads the version from sharedstate/_version.py"
    assert metadata["Requires-Python"] == ">=3.10" and metadata["License-Expression"] == "MIT"
    assert EXTRAS <= set(metadata.get_all("Provides-Extra"))
    required = {re.split(r"[<>=;\[ ]", r)[0] for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    assert required == {"psutil", "filelock", "croniter", "google-re2"}
    # redis-py with its parser in C: a busy Redis watcher spends less than half the CPU per change (docs/redis.md)
    assert any(re.match(r'redis\[hiredis\]>=[\d.]+; extra == "redis"$', r) for r in metadata.get_all("Requires-Dist"))
    assert metadata["Description-Content-Type"] == "text/markdown" and "# sharedstate" in metadata.get_payload()


def _start(command: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    # its own session: stopped as a service manager would, SIGTERM to the whole group
    return subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def test_the_readme_web_servers_serve_and_keep_the_count(checkout: Path, venv_bin: Path, examples_extra: None):
    """The three commands share hits.json in the checkout's root: each goes on from the last one's count."""
    hits = 0
    for command in WEB_SERVERS:
        port = free_port()
        env = _env(venv_bin, GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{port}", UVICORN_PORT=str(port))
        proc = _start(command, checkout, env)
        try:
            wait_ready(proc, port)
            assert [get(port)["hits"], get(port)["hits"]] == [hits + 1, hits + 2], command
            hits += 2
        finally:
            stop_group(proc)
        assert read_snapshot(checkout / "hits.json").data["hits"] == hits, command


def test_the_readme_serve_and_get_commands(checkout: Path, venv_bin: Path):
    env = _env(venv_bin)
    proc = _start(SERVE, checkout, env)
    try:
        deadline = time.monotonic() + 60
        while not (checkout / "state.sock").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "serve made no socket within 60 s"
            time.sleep(0.05)
        # The README's Python lines before these commands set the name (state["greeting"] = "hello").
        subprocess.run([venv_bin / "sharedstate", "set", "greeting", '"hello"', "--address", "state.sock"],
                       cwd=checkout, env=env, check=True, timeout=60)  # fmt: skip
        assert run_snippet("README serve/get", GET, checkout, str(venv_bin)).strip() == '"hello"'
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        reap(proc)
        proc.stderr.close()
    assert read_snapshot(checkout / "state.json").data == {"greeting": "hello"}


def test_the_redis_and_examples_extras_install(checkout: Path, venv_bin: Path, examples_extra: None):
    run_snippet("pip install extras", "pip install '.[redis,examples]'", checkout, str(venv_bin), INSTALL_TIMEOUT_S)
    done = subprocess.run(
        [venv_bin / "python", "-c", "import redis.utils, gunicorn, uvicorn, fastapi, flask, sharedstate\n"
         "assert redis.utils.HIREDIS_AVAILABLE, 'the redis extra brings hiredis'"],
        cwd=checkout.parent, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
