"""Reading a hash map while the daemon deletes from it: every key once, on the real kernel.

The reconciler deletes keys (a gone pod's drops, a sweep's expired queries) while a scrape
reads the same map. A walk by BPF_MAP_GET_NEXT_KEY restarts from the first bucket when
its current key was deleted meanwhile, so it returns keys it had returned already:
counters summed over such a walk jump up, the next scrape is lower, Prometheus sees a
reset (issue 14). Maps here are made with bcc, nothing attached.
"""

from __future__ import annotations

import os
import random
import struct
import threading
from collections.abc import Iterator

import pytest

from monitor.kernel import syscalls
from monitor.kernel.maps import MapHandle

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root and the real kernel")]

KEYS = 20_000


@pytest.fixture(scope="module")
def tables() -> Iterator[dict[str, MapHandle]]:
    from bcc import BPF  # type: ignore[import-untyped]

    module = BPF(text=f"""
BPF_HASH(plain, u32, u64, {KEYS});
BPF_TABLE("lru_hash", u32, u64, lru, {KEYS});
BPF_TABLE("percpu_hash", u32, u64, percpu, {KEYS});
""")
    ncpus = syscalls.possible_cpus()
    try:
        yield {name: MapHandle(name, module[name.encode()].map_fd, 4, 8, name == "percpu",
                               ncpus, KEYS) for name in ("plain", "lru", "percpu")}
    finally:
        module.cleanup()


@pytest.mark.parametrize("name", ["plain", "lru", "percpu"])
def test_a_walk_beside_deletes_returns_every_key_at_most_once(
        tables: dict[str, MapHandle], name: str) -> None:
    handle = tables[name]
    for attempt in range(5):  # each round: fill, then read while another thread empties it
        keys = list(range(KEYS))
        for k in keys:
            handle.put(struct.pack("=I", k), struct.pack("=Q", k + 1))
        random.Random(attempt).shuffle(keys)
        go = threading.Event()

        def delete(order: list[int] = keys, go: threading.Event = go) -> None:
            go.wait()
            for k in order:
                handle.delete(struct.pack("=I", k))

        deleter = threading.Thread(target=delete)
        deleter.start()
        go.set()
        got = [struct.unpack("=I", k)[0] for k, _v in handle.items()]
        deleter.join()
        assert len(got) == len(set(got)), (name, attempt, len(got) - len(set(got)))
        # and what was returned is what was there: a key's own value, never a mix
        assert all(0 <= k < KEYS for k in got)
    assert handle.items() == []
