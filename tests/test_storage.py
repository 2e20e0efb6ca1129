"""LocalFileStorage: the Quix storage API, durable writes, safe keys, several processes at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import workers
from conftest import ROOT, reap, run_to_completion
from contract.storable import VALUES, same

import sharedstate


@pytest.fixture
def storage(tmp_path):
    return sharedstate.LocalFileStorage(tmp_path / "state")


def test_the_quix_usage_works_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = sharedstate.LocalFileStorage()  # ./state
    assert storage.directory == tmp_path / "state" and storage.directory.is_dir()
    storage.set("float", 1.5)
    storage.set("string", "text")
    storage.set("bool", True)
    storage.set("bytes", b"\x00\x01")
    storage.set("bytearray", bytearray(b"ab"))
    assert storage.get("float") == 1.5 and type(storage.get("float")) is float
    assert storage.get("string") == "text"
    assert storage.get("bool") is True
    assert storage.get("bytes") == b"\x00\x01" and type(storage.get("bytes")) is bytes
    assert storage.get("bytearray") == bytearray(b"ab") and type(storage.get("bytearray")) is bytearray
    assert storage.containsKey("float") and storage.contains_key("float")
    assert not storage.containsKey("nothing")
    keys = storage.getAllKeys()
    assert isinstance(keys, set) and keys == {"float", "string", "bool", "bytes", "bytearray"}
    assert storage.get_all_keys() == keys
    storage.remove("float")
    storage.remove("float")  # removing a missing key is fine
    assert storage.get("float") is None and storage.get("float", 0) == 0
    storage.clear()
    assert storage.getAllKeys() == set()


def test_every_value_type_keeps_its_type(storage):
    for name, value in VALUES.items():
        storage.set(name, value)
    reopened = sharedstate.LocalFileStorage(storage.directory)
    for name, value in VALUES.items():
        assert same(reopened.get(name), value), name


KEYS = ["Key", "key", "../../escape", "a/b\\c:d*?", "", "😀" * 160, "..", ".", "\x00nul", "CON", "con.json"]


def test_any_str_key_is_kept_apart_and_inside_the_directory(storage, tmp_path):
    for i, key in enumerate(KEYS):
        storage.set(key, i)
    for i, key in enumerate(KEYS):
        assert storage.get(key) == i, repr(key)
    assert storage.getAllKeys() == set(KEYS)
    outside = {p for p in tmp_path.rglob("*") if storage.directory not in (p, *p.parents)}
    assert outside == set()
    assert all(len(p.name) <= 255 for p in storage.directory.iterdir())
    storage.remove("Key")
    assert storage.get("key") == KEYS.index("key") and not storage.containsKey("Key")


def test_bad_keys_and_values_are_refused_and_nothing_is_written(storage):
    with pytest.raises(TypeError):
        storage.set(5, 1)
    with pytest.raises(TypeError, match="'k'"):
        storage.set("k", object())
    with pytest.raises(TypeError):
        storage.get(b"k")
    assert storage.getAllKeys() == set()


def test_a_missing_directory_without_auto_create_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="auto_create_dir"):
        sharedstate.LocalFileStorage(tmp_path / "absent", auto_create_dir=False)
    assert not (tmp_path / "absent").exists()


def test_a_damaged_entry_raises_snapshot_error_naming_the_key_and_file(storage):
    storage.set("k", 1)
    [entry] = [p for p in storage.directory.iterdir() if p.name.endswith(".json")]
    entry.write_text("{not json")
    with pytest.raises(sharedstate.SnapshotError) as info:
        storage.get("k")
    assert str(entry) in str(info.value)


def test_stray_temporary_files_of_a_crash_are_cleaned_up(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stray = folder / f".k-6b.json.{dead.stdout.strip()}.0123abcd.tmp"
    stray.write_text("half")
    sharedstate.LocalFileStorage(folder)
    assert not stray.exists()


def test_a_writer_killed_after_its_200th_set_lost_none(tmp_path):
    folder = tmp_path / "state"
    code = (
        "import os, signal, sys, sharedstate\n"
        f"s = sharedstate.LocalFileStorage({str(folder)!r})\n"
        "for i in range(200):\n"
        "    s.set(f'k{i}', {'i': i, 'b': b'x' * i})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=120
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    storage = sharedstate.LocalFileStorage(folder)
    assert len(storage.getAllKeys()) == 200
    assert all(storage.get(f"k{i}") == {"i": i, "b": b"x" * i} for i in range(200))


def test_four_processes_writing_300_keys_each_leave_1200(tmp_path, mp_context):
    folder = str(tmp_path / "state")
    procs = [mp_context.Process(target=workers.fill_storage, args=(folder, p, 300)) for p in range(4)]
    run_to_completion(procs, 120)
    storage = sharedstate.LocalFileStorage(folder)
    keys = storage.getAllKeys()
    assert len(keys) == 1200
    assert storage.get("p3-299") == 299


def test_clear_from_one_process_while_another_writes(tmp_path):
    folder = str(tmp_path / "state")
    ctx = multiprocessing.get_context("spawn")
    writer = ctx.Process(target=workers.fill_storage, args=(folder, 0, 200))
    writer.start()
    storage = sharedstate.LocalFileStorage(folder)
    try:
        for _ in range(20):
            storage.clear()
        writer.join(120)
        assert writer.exitcode == 0
    finally:
        reap(writer)
    keys = storage.getAllKeys()
    assert all(storage.get(k) == int(k.split("-")[1]) for k in keys)  # every survivor is whole
