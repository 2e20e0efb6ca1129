"""The Quix SDK's storage example, on sharedstate.LocalFileStorage: durable, no server.

Run: python examples/quix_storage.py [FOLDER]      (default: ./state)
"""

from __future__ import annotations

import sys

import sharedstate


def main() -> None:
    storage = sharedstate.LocalFileStorage(sys.argv[1] if len(sys.argv) > 1 else None)
    storage.set("KEY1", 12.51)
    storage.set("KEY2", "str")
    storage.set("KEY3", True)
    storage.set("KEY4", b"\x00\x01")
    storage.set("KEY5", bytearray(b"ba"))
    for key in sorted(storage.getAllKeys()):
        value = storage.get(key)
        print(f"{key} = {value!r} ({type(value).__name__})")
    print("containsKey('KEY1'):", storage.containsKey("KEY1"))
    storage.remove("KEY1")
    print("after remove:", sorted(storage.getAllKeys()))
    storage.clear()
    print("after clear:", storage.getAllKeys())


if __name__ == "__main__":
    main()
