"""monitor.traces.store: the directory of stored captures, its ids, permissions and retention."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.traces.store import ID_RE, CaptureStore, StoredCapture


@pytest.fixture
def umask() -> Iterator[None]:
    """A permissive umask, so 0700/0600 come from the store and not from the environment."""
    old = os.umask(0o002)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def store_in(tmp_path: Path, *, max_files: int = 100, max_bytes: int = 1 << 30) -> CaptureStore:
    return CaptureStore(str(tmp_path / "var" / "captures"), max_files=max_files, max_bytes=max_bytes)


# -- create ---------------------------------------------------------------------------------------

@pytest.mark.usefixtures("umask")
def test_create_makes_a_private_directory_and_files(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    assert not store.dir.exists()  # made on first use, parents too
    record, path = store.create("shop", "web", "alert HighDrops", "udp port 53", 30.0)
    assert mode(store.dir) == 0o700
    assert path == store.dir / f"{record.id}.pcapng"
    assert (path.stat().st_size, mode(path)) == (0, 0o600)
    meta = store.dir / f"{record.id}.json"
    assert mode(meta) == 0o600
    assert json.loads(meta.read_text()) == {
        "id": record.id, "namespace": "shop", "pod": "web", "started": record.started,
        "reason": "alert HighDrops", "filter": "udp port 53", "duration": 30.0, "bytes": 0,
        "packets": 0, "ended": ""}
    assert sorted(p.name for p in store.dir.iterdir()) == sorted([path.name, meta.name])  # no tmp left


@pytest.mark.usefixtures("umask")
def test_create_tightens_a_directory_made_by_someone_else(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    store.dir.mkdir(parents=True, mode=0o755)  # the kubelet's DirectoryOrCreate makes it 0755
    os.chmod(store.dir, 0o755)  # noqa: S103 - the permissive mode the store must tighten
    store.create("shop", "web", "alert A", "", 10.0)
    assert mode(store.dir) == 0o700


def test_ids_are_unique_and_of_the_one_shape(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    ids = [store.create("shop", "web", "alert A", "", 10.0)[0].id for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(ID_RE.fullmatch(i) for i in ids)
    assert all(store.path(i) == store.dir / f"{i}.pcapng" for i in ids)


def test_save_replaces_the_record(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    record, _ = store.create("shop", "web", "alert A", "", 10.0)
    record.packets, record.bytes, record.ended = 12, 3456, "duration reached"
    store.save(record)
    assert store.captures() == [record]


# -- path -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("capture_id", [
    "../x", "a/b", "", ".", "..", "/etc/passwd", "20240101T000000Z-deadbeef/../x",
    "../20240101T000000Z-deadbeef", "20240101T000000Z-deadbee", "20240101T000000Z-deadbeef0",
    "20240101T000000Z-DEADBEEF", "20240101T000000-deadbeef", "20240101T000000Z_deadbeef",
    "20240101T000000Z-deadbeef\n", "20240101T000000Z-deadbeef.pcapng", "20240101T000000Z-deadbeef.json",
    "\uff120240101T000000Z-deadbeef",  # a fullwidth 2: \d would take it, [0-9] does not
])
def test_path_refuses_ids_of_other_shapes(tmp_path: Path, capture_id: str) -> None:
    store = store_in(tmp_path)
    store.dir.mkdir(parents=True)
    (tmp_path / "x.pcapng").write_bytes(b"not yours")
    assert store.path(capture_id) is None


def test_path_refuses_unknown_ids(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    assert store.path("20240101T000000Z-deadbeef") is None  # no directory yet
    store.create("shop", "web", "alert A", "", 10.0)
    assert store.path("20240101T000000Z-deadbeef") is None
    (store.dir / "20240101T000000Z-0badf00d.pcapng").mkdir()  # not a file
    assert store.path("20240101T000000Z-0badf00d") is None


# -- captures -------------------------------------------------------------------------------------

def test_captures_skips_what_is_not_a_record(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    assert store.captures() == []  # no directory: none
    first, _ = store.create("shop", "web", "alert A", "", 10.0)
    second, _ = store.create("shop", "db", "alert B", "tcp", 20.0)
    first.started, second.started = 2000.0, 1000.0
    store.save(first)
    store.save(second)
    junk = {"junk-not-json.json": "{", "junk-list.json": "[1, 2]", "junk-empty.json": "",
            "junk-missing.json": json.dumps({"id": "x", "namespace": "shop"}),
            "junk-extra.json": json.dumps({**first.__dict__, "id": "y", "owner": "mallory"}),
            "junk-binary.json": "\udcff"}
    for name, text in junk.items():
        (store.dir / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    (store.dir / "notes.txt").write_text(json.dumps(first.__dict__))
    (store.dir / f".{first.id}.json.tmp").write_text("{")  # a save cut short
    assert store.captures() == [second, first]  # oldest first


# -- enforce --------------------------------------------------------------------------------------

def filled(store: CaptureStore, sizes: list[int]) -> list[StoredCapture]:
    """Captures of these sizes, oldest first (started 1000, 1001, ...)."""
    records = []
    for i, size in enumerate(sizes):
        record, path = store.create("shop", f"pod-{i}", "alert A", "", 10.0)
        path.write_bytes(b"\0" * size)
        record.started = 1000.0 + i
        store.save(record)
        records.append(record)
    return records


def left(store: CaptureStore) -> list[str]:
    return [c.id for c in store.captures()]


def files(store: CaptureStore) -> set[str]:
    return {p.name for p in store.dir.iterdir()}


def test_enforce_keeps_at_most_max_files(tmp_path: Path) -> None:
    store = store_in(tmp_path, max_files=3)
    records = filled(store, [10, 10, 10, 10, 10])
    ids = [r.id for r in records]
    assert store.enforce() == ids[:2]
    assert left(store) == ids[2:]
    assert files(store) == {f"{i}{suffix}" for i in ids[2:] for suffix in (".pcapng", ".json")}
    assert store.enforce() == []  # within the limits now


def test_enforce_keeps_at_most_max_bytes(tmp_path: Path) -> None:
    store = store_in(tmp_path, max_bytes=1000)
    records = filled(store, [600, 300, 200, 400])  # 1500 in all
    ids = [r.id for r in records]
    assert store.enforce() == ids[:1]  # 900 left
    assert left(store) == ids[1:]
    store = store_in(tmp_path / "other", max_bytes=1000)
    ids = [r.id for r in filled(store, [100, 100, 100, 950])]
    assert store.enforce() == ids[:3]  # the newest alone is within the limit
    assert left(store) == ids[3:]


def test_enforce_deletes_by_age_not_by_name(tmp_path: Path) -> None:
    store = store_in(tmp_path, max_files=1)
    older, newer = filled(store, [1, 1])
    older.started, newer.started = 5000.0, 10.0  # ids sort the other way round
    store.save(older)
    store.save(newer)
    assert store.enforce() == [newer.id]
    assert left(store) == [older.id]


def test_enforce_both_limits(tmp_path: Path) -> None:
    store = store_in(tmp_path, max_files=3, max_bytes=500)
    ids = [r.id for r in filled(store, [100, 100, 300, 300])]
    # 4 > 3 files: the oldest goes; then 700, 600 > 500 bytes: two more
    assert store.enforce() == ids[:3]
    assert left(store) == ids[3:]


def test_enforce_deletes_a_record_whose_file_is_gone(tmp_path: Path) -> None:
    store = store_in(tmp_path, max_files=2)
    ids = [r.id for r in filled(store, [100, 100, 100])]
    (store.dir / f"{ids[0]}.pcapng").unlink()  # counts 0 bytes, still one of the files
    assert store.enforce() == ids[:1]
    assert files(store) == {f"{i}{suffix}" for i in ids[1:] for suffix in (".pcapng", ".json")}


def test_enforce_with_no_directory(tmp_path: Path) -> None:
    assert store_in(tmp_path, max_files=1).enforce() == []


def test_enforce_never_deletes_outside_the_directory(tmp_path: Path) -> None:
    store = store_in(tmp_path, max_files=0)
    store.dir.mkdir(parents=True)
    victim = store.dir.parent / "precious.pcapng"
    victim.write_bytes(b"someone else's")
    forged = StoredCapture("../precious", "shop", "web", 1.0, "alert A")
    (store.dir / "20240101T000000Z-deadbeef.json").write_text(json.dumps(forged.__dict__))
    assert store.captures() == []  # an id that is not ours is no record of ours
    assert store.enforce() == []
    assert victim.exists()


def test_a_record_must_be_in_its_own_file(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    record, _ = store.create("shop", "web", "alert A", "", 10.0)
    other = StoredCapture("20240101T000000Z-0badf00d", "shop", "db", 2.0, "alert B")
    (store.dir / f"{record.id}.json").write_text(json.dumps(other.__dict__))  # names another id
    assert store.captures() == []


def test_a_record_with_a_field_of_the_wrong_type_is_skipped(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    good, _ = store.create("shop", "web", "alert A", "", 10.0)
    bad = StoredCapture("20240101T000000Z-0badf00d", "shop", "db", None, "alert B")  # type: ignore[arg-type]
    (store.dir / f"{bad.id}.json").write_text(json.dumps(bad.__dict__))
    assert store.captures() == [good]
