"""monitor.runtime: pod UIDs from OCI bundles (containerd and CRI-O layouts) on fake trees."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from monitor import runtime
from monitor.runtime import RuntimeIndex, bundle_netns_uid

UID_A = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
UID_B = "6f2c1a8e-9b0d-4c3e-8f7a-6b5c4d3e2f1a"
UID_C = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def oci(netns: str | None, annotations: dict[str, Any] | None) -> dict[str, Any]:
    """An OCI runtime config: the namespaces a container joins, and its annotations."""
    namespaces: list[dict[str, str]] = [{"type": "pid"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}]
    if netns is not None:
        namespaces.append({"type": "network", "path": netns})
    doc: dict[str, Any] = {"ociVersion": "1.1.0", "linux": {"namespaces": namespaces}}
    if annotations is not None:
        doc["annotations"] = annotations
    return doc


class Tree:
    """A host's runtime state under tmp: containerd and CRI-O bundle dirs, pinned netns files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.containerd = root / "run/containerd/io.containerd.runtime.v2.task/k8s.io"
        self.crio = root / "var/lib/containers/storage/overlay-containers"
        self.netns = root / "run/netns"
        for d in (self.containerd, self.crio, self.netns):
            d.mkdir(parents=True)
        (root / "var/run").symlink_to(root / "run")  # /var/run -> /run, as on most hosts

    def pin(self, name: str) -> str:
        (self.netns / name).touch()
        return str(self.netns / name)

    def containerd_bundle(self, cid: str, doc: object) -> Path:
        path = self.containerd / cid / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
        return path

    def crio_bundle(self, cid: str, doc: object) -> Path:
        path = self.crio / cid / "userdata" / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
        return path

    def index(self) -> RuntimeIndex:
        return RuntimeIndex([str(self.containerd), str(self.crio), str(self.root / "nonexistent")])


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


class Reads:
    """Counts the bundle files RuntimeIndex parses."""

    def __init__(self, index: RuntimeIndex, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        original = index._load

        def load(path: str) -> object:
            self.paths.append(path)
            return original(path)

        monkeypatch.setattr(index, "_load", load)

    def take(self) -> list[str]:
        paths, self.paths = sorted(self.paths), []
        return paths


# -- bundle_netns_uid -------------------------------------------------------------------------------

def test_containerd_annotation() -> None:
    doc = oci("/var/run/netns/cni-1", {"io.kubernetes.cri.sandbox-uid": UID_A,
                                       "io.kubernetes.cri.container-type": "container"})
    assert bundle_netns_uid(doc) == ("/var/run/netns/cni-1", UID_A)


def test_crio_annotation() -> None:
    assert bundle_netns_uid(oci("/var/run/netns/9f3c", {"io.kubernetes.pod.uid": UID_B})) == (
        "/var/run/netns/9f3c", UID_B)


def test_pod_uid_annotation_first_when_both() -> None:
    doc = oci("/run/netns/x", {"io.kubernetes.cri.sandbox-uid": UID_A, "io.kubernetes.pod.uid": UID_B})
    assert bundle_netns_uid(doc) == ("/run/netns/x", UID_B)


def test_empty_first_annotation_falls_back_to_the_other() -> None:
    doc = oci("/run/netns/x", {"io.kubernetes.pod.uid": "", "io.kubernetes.cri.sandbox-uid": UID_A})
    assert bundle_netns_uid(doc) == ("/run/netns/x", UID_A)


@pytest.mark.parametrize("doc", [
    pytest.param(None, id="null"),
    pytest.param([], id="list"),
    pytest.param(oci("/run/netns/x", None), id="no-annotations"),
    pytest.param({**oci("/run/netns/x", None), "annotations": ["io.kubernetes.pod.uid"]},
                 id="annotations-list"),
    pytest.param(oci("/run/netns/x", {"io.kubernetes.pod.name": "web"}), id="no-uid-annotation"),
    pytest.param(oci("/run/netns/x", {"io.kubernetes.pod.uid": 7}), id="uid-not-a-string"),
    pytest.param(oci(None, {"io.kubernetes.pod.uid": UID_A}), id="own-netns"),
    pytest.param({"annotations": {"io.kubernetes.pod.uid": UID_A}}, id="no-linux"),
    pytest.param({"annotations": {"io.kubernetes.pod.uid": UID_A}, "linux": []}, id="linux-list"),
    pytest.param({"annotations": {"io.kubernetes.pod.uid": UID_A}, "linux": {"namespaces": {}}},
                 id="namespaces-dict"),
    pytest.param({"annotations": {"io.kubernetes.pod.uid": UID_A},
                  "linux": {"namespaces": [{"type": "network"}]}}, id="network-without-path"),
    pytest.param({"annotations": {"io.kubernetes.pod.uid": UID_A},
                  "linux": {"namespaces": ["network", {"type": "network", "path": 3}]}},
                 id="odd-entries"),
])
def test_no_netns_uid(doc: object) -> None:
    assert bundle_netns_uid(doc) is None


# -- RuntimeIndex on fake trees --------------------------------------------------------------------

def test_both_layouts(tree: Tree) -> None:
    a = tree.pin("cni-0a1b")
    b = tree.pin("5f1c7e2a-crio")
    tree.containerd_bundle("c1", oci(a, {"io.kubernetes.cri.sandbox-uid": UID_A}))
    tree.containerd_bundle("c2", oci(a, {"io.kubernetes.cri.sandbox-uid": UID_A}))  # same pod
    tree.crio_bundle("k1", oci(b, {"io.kubernetes.pod.uid": UID_B}))
    assert tree.index().uids() == {a: UID_A, b: UID_B}


def test_netns_spelt_through_a_linked_dir_resolves(tree: Tree) -> None:
    real = tree.pin("5f1c7e2a")
    linked = str(tree.root / "var/run/netns/5f1c7e2a")
    tree.crio_bundle("k1", oci(linked, {"io.kubernetes.pod.uid": UID_B}))
    index = tree.index()
    assert index.uids() == {real: UID_B}
    assert index.uid_of(linked) == UID_B
    assert index.uid_of(real) == UID_B
    assert index.uid_of(str(tree.netns / "other")) is None


def test_bad_bundles_are_skipped(tree: Tree) -> None:
    good = tree.pin("good")
    tree.containerd_bundle("good", oci(good, {"io.kubernetes.cri.sandbox-uid": UID_A}))
    truncated = tree.containerd_bundle("truncated", {})
    truncated.write_text('{"annotations": {"io.kubernetes.cri.sandbox-uid": "')
    undecodable = tree.crio_bundle("undecodable", {})
    undecodable.write_bytes(b'{"annotations": "\xff\xfe"}')
    tree.crio_bundle("no-uid", oci(good, {"io.kubernetes.pod.name": "x"}))
    tree.crio_bundle("a-list", [1, 2])
    (tree.containerd / "dir-without-config").mkdir()
    (tree.containerd / "a-file").write_text("not a bundle")
    (tree.containerd / "config-is-a-dir" / "config.json").mkdir(parents=True)
    assert tree.index().uids() == {good: UID_A}


def test_unreadable_bundle_is_skipped(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tree.pin("good")
    tree.containerd_bundle("good", oci(good, {"io.kubernetes.cri.sandbox-uid": UID_A}))
    locked = tree.containerd_bundle("locked", oci(tree.pin("locked"),
                                                  {"io.kubernetes.cri.sandbox-uid": UID_B}))
    real_open = open

    def deny(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    assert tree.index().uids() == {good: UID_A}


def test_missing_dirs_are_no_error(tmp_path: Path) -> None:
    assert RuntimeIndex([str(tmp_path / "none"), str(tmp_path / "nothing")]).uids() == {}
    assert RuntimeIndex([]).uids() == {}


def test_only_changed_files_are_read_again(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tree.pin("a"), tree.pin("b")
    pa = tree.containerd_bundle("ca", oci(a, {"io.kubernetes.cri.sandbox-uid": UID_A}))
    pb = tree.crio_bundle("kb", oci(b, {"io.kubernetes.pod.uid": UID_B}))
    index = tree.index()
    reads = Reads(index, monkeypatch)
    assert index.uids() == {a: UID_A, b: UID_B}
    assert reads.take() == sorted([str(pa), str(pb)])
    assert index.uids() == {a: UID_A, b: UID_B}
    assert reads.take() == []  # nothing changed: nothing parsed

    stat = pb.stat()
    pb.write_text(json.dumps(oci(b, {"io.kubernetes.pod.uid": UID_C})) + "  ")  # another size
    os.utime(pb, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert index.uids() == {a: UID_A, b: UID_C}
    assert reads.take() == [str(pb)]

    stat = pa.stat()
    os.utime(pa, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new mtime only
    assert index.uids() == {a: UID_A, b: UID_C}
    assert reads.take() == [str(pa)]


def test_same_size_and_mtime_is_taken_as_unchanged(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tree.pin("a")
    path = tree.containerd_bundle("ca", oci(a, {"io.kubernetes.cri.sandbox-uid": UID_A}))
    index = tree.index()
    reads = Reads(index, monkeypatch)
    assert index.uids() == {a: UID_A}
    stat = path.stat()
    path.write_text(json.dumps(oci(a, {"io.kubernetes.cri.sandbox-uid": UID_B})))  # same length
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert index.uids() == {a: UID_A}  # the stamp is (mtime, size): by design, not re-parsed
    assert reads.take() == [str(path)]  # the first pass only


def test_a_removed_bundle_is_forgotten(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tree.pin("a"), tree.pin("b")
    tree.containerd_bundle("ca", oci(a, {"io.kubernetes.cri.sandbox-uid": UID_A}))
    pb = tree.containerd_bundle("cb", oci(b, {"io.kubernetes.cri.sandbox-uid": UID_B}))
    index = tree.index()
    reads = Reads(index, monkeypatch)
    assert index.uids() == {a: UID_A, b: UID_B}
    saved = pb.read_bytes()
    stat = pb.stat()
    shutil.rmtree(pb.parent)
    assert index.uids() == {a: UID_A}
    reads.take()
    # the same file back with the same stamp: read again, so nothing of it was kept
    pb.parent.mkdir()
    pb.write_bytes(saved)
    os.utime(pb, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert index.uids() == {a: UID_A, b: UID_B}
    assert reads.take() == [str(pb)]


def test_a_bad_bundle_fixed_later_is_read_again(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tree.pin("a")
    path = tree.containerd_bundle("ca", {})
    path.write_text("{")  # a runtime caught half-way through writing it
    index = tree.index()
    assert index.uids() == {}
    path.write_text(json.dumps(oci(a, {"io.kubernetes.cri.sandbox-uid": UID_A})))
    assert index.uids() == {a: UID_A}


def test_containerd_layout_wins_when_a_bundle_has_both(tree: Tree) -> None:
    a, b = tree.pin("a"), tree.pin("b")
    tree.containerd_bundle("c1", oci(a, {"io.kubernetes.cri.sandbox-uid": UID_A}))
    (tree.containerd / "c1" / "userdata").mkdir()
    (tree.containerd / "c1" / "userdata" / "config.json").write_text(
        json.dumps(oci(b, {"io.kubernetes.pod.uid": UID_B})))
    assert tree.index().uids() == {a: UID_A}


def test_uid_annotations_named_as_documented() -> None:
    assert set(runtime.UID_ANNOTATIONS) == {"io.kubernetes.pod.uid", "io.kubernetes.cri.sandbox-uid"}


# -- podman's containers (no Kubernetes) -----------------------------------------------------------

PODMAN = {"io.container.manager": "libpod", "io.podman.annotations.autoremove": "FALSE"}
ID_WEB = "9dfe1d358170556ef338823f33bdc76a3e11e53b7ef1a1c0e48daa48e99b182c"
ID_SIDE = "7c0b3a1e2f4d5c6b7a8f9e0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b"


def storage_index(tree: Tree, names: dict[str, list[str]]) -> None:
    """containers/storage's containers.json, as podman 4 writes it beside the bundles."""
    (tree.crio / "containers.json").write_text(json.dumps(
        [{"id": cid, "names": n, "image": "0933c08ac49b", "layer": "a93e86a4e749",
          "metadata": json.dumps({"name": n[0] if n else ""})} for cid, n in names.items()]))


def test_a_podman_container_is_named_from_containers_json(tree: Tree) -> None:
    pin = tree.pin("netns-29cb62c5-93be-5fd6-4053-56c9f4552633")
    tree.crio_bundle(ID_WEB, oci(pin, PODMAN))
    # a second container joining the first's netns (--network container:web)
    tree.crio_bundle(ID_SIDE, oci("/proc/24700/ns/net", PODMAN))
    storage_index(tree, {ID_WEB: ["web"], ID_SIDE: ["sidecar"]})
    index = tree.index()
    assert index.podman_containers() == {pin: runtime.PodMeta(
        namespace="_podman", name="web", uid=ID_WEB, workload="web", workload_kind="Container")}
    assert index.uids() == {}  # no pod UID: not a Kubernetes pod


def test_a_podman_container_without_a_name_is_shown_as_podman_ps_does(tree: Tree) -> None:
    pin = tree.pin("netns-1")
    tree.crio_bundle(ID_WEB, oci(pin, PODMAN))
    assert tree.index().podman_containers()[pin].name == ID_WEB[:12]  # no containers.json
    storage_index(tree, {ID_WEB: []})
    assert tree.index().podman_containers()[pin].name == ID_WEB[:12]


def test_containers_json_is_read_again_when_it_changes(tree: Tree) -> None:
    pin = tree.pin("netns-1")
    tree.crio_bundle(ID_WEB, oci(pin, PODMAN))
    storage_index(tree, {ID_WEB: ["web"]})
    index = tree.index()
    assert index.podman_containers()[pin].name == "web"
    storage_index(tree, {ID_WEB: ["web-renamed"]})  # podman rename
    assert index.podman_containers()[pin].name == "web-renamed"
    (tree.crio / "containers.json").write_text("[{")  # half-written: no name, no failure
    assert index.podman_containers()[pin].name == ID_WEB[:12]


def test_a_pod_of_kubernetes_is_never_a_podman_container(tree: Tree) -> None:
    pin = tree.pin("netns-2")
    tree.crio_bundle(ID_WEB, oci(pin, {**PODMAN, "io.kubernetes.pod.uid": UID_A}))
    index = tree.index()
    assert index.podman_containers() == {}
    assert index.uids() == {pin: UID_A}
