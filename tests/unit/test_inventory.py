"""The static inventory file: parsing, validation, reloading, lookup."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from monitor.identity import PodMeta
from monitor.metadata import static
from monitor.metadata.static import InventoryError, NoMetadata, StaticInventory, load, parse

UID_WEB = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
UID_DB = "6f2c1a8e-9b0d-4c3e-8f7a-6b5c4d3e2f1a"

GOOD = f"""\
# a comment
pods:
  - uid: {UID_WEB}
    namespace: shop
    name: web-7c9f-abcde
    labels: {{app: web, tier: "1"}}
    owner: {{kind: Deployment, name: web}}
  - netns: /run/netns/cni-7f3c
    namespace: shop
    name: db-0
  - uid: {UID_DB}
    netns: /run/netns/cni-both
    namespace: kube-system
    name: dns
    labels: {{replicas: 2}}
"""

WEB = PodMeta("shop", "web-7c9f-abcde", uid=UID_WEB, labels=(("app", "web"), ("tier", "1")),
              workload="web", workload_kind="Deployment")
DB = PodMeta("shop", "db-0")
DNS = PodMeta("kube-system", "dns", uid=UID_DB, labels=(("replicas", "2"),))


def test_parse_good_file() -> None:
    inv = parse(GOOD)
    assert inv.by_uid == {UID_WEB: WEB, UID_DB: DNS}
    assert inv.by_netns == {"/run/netns/cni-7f3c": DB, "/run/netns/cni-both": DNS}


def test_parse_empty_pods_list() -> None:
    inv = parse("pods: []\n")
    assert (inv.by_uid, inv.by_netns) == ({}, {})


def entry(**fields: object) -> dict[str, object]:
    return {"uid": UID_WEB, "namespace": "shop", "name": "web", **fields}


def one(raw: object) -> str:
    """The error message for an inventory with one entry."""
    with pytest.raises(InventoryError) as info:
        parse(yaml.safe_dump({"pods": [raw]}), "inv.yaml")
    return str(info.value)


@pytest.mark.parametrize(("raw", "problem"), [
    pytest.param({"uid": UID_WEB, "name": "web"}, "'namespace' must be a non-empty string",
                 id="no-namespace"),
    pytest.param({"uid": UID_WEB, "namespace": "shop"}, "'name' must be a non-empty string",
                 id="no-name"),
    pytest.param(entry(namespace=""), "'namespace' must be a non-empty string", id="empty-namespace"),
    pytest.param(entry(name=7), "'name' must be a non-empty string", id="name-int"),
    pytest.param({"namespace": "shop", "name": "web"}, "needs 'uid' or 'netns'", id="no-uid-no-netns"),
    pytest.param(entry(uid=1234), "'uid' must be a non-empty string", id="uid-int"),
    pytest.param(entry(uid=""), "'uid' must be a non-empty string", id="uid-empty"),
    pytest.param(entry(netns=["/run/netns/a"]), "'netns' must be a non-empty string", id="netns-list"),
    pytest.param(entry(nmae="typo"), "unknown keys ['nmae']", id="unknown-key"),
    pytest.param(entry(labels=["app=web"]), "'labels' must map strings to strings", id="labels-list"),
    pytest.param(entry(labels={"app": None}), "'labels' must map strings to strings",
                 id="label-value-null"),
    pytest.param(entry(labels={"app": {"x": 1}}), "'labels' must map strings to strings",
                 id="label-value-map"),
    pytest.param(entry(labels={1: "a"}), "'labels' must map strings to strings", id="label-key-int"),
    pytest.param(entry(owner="web"), "'owner' must be {kind: ..., name: ...}", id="owner-str"),
    pytest.param(entry(owner={"kind": "Deployment", "nmae": "web"}),
                 "'owner' must be {kind: ..., name: ...}", id="owner-unknown-key"),
    pytest.param(entry(owner={"kind": "Deployment", "name": 3}),
                 "'owner' must be {kind: ..., name: ...}", id="owner-name-int"),
    # what Kubernetes and the kubelet can give, no more: a pod UID (an RFC 4122 UUID, or a
    # static pod's 32-hex config hash), a DNS-1123 label as namespace, a DNS-1123 subdomain
    # as name, and a pinned netns by its absolute path
    pytest.param(entry(uid="not-a-uid"), "uid 'not-a-uid' is not a pod UID", id="uid-not-a-uid"),
    pytest.param(entry(uid="1b4e28ba2fa111d2883f0016d3cca42"), "is not a pod UID",
                 id="uid-31-hex"),
    pytest.param(entry(uid=UID_WEB + "0"), "is not a pod UID", id="uid-too-long"),
    pytest.param(entry(uid="1b4e28ba_2fa1_11d2_883f_0016d3cca427"), "is not a pod UID",
                 id="uid-systemd-spelling"),
    pytest.param(entry(namespace="Shop_Bad"), "namespace 'Shop_Bad' is not a Kubernetes "
                 "namespace name", id="namespace-not-dns-label"),
    pytest.param(entry(namespace="a" * 64), "is not a Kubernetes namespace name",
                 id="namespace-64"),
    pytest.param(entry(namespace="_unknown"), "is not a Kubernetes namespace name",
                 id="namespace-the-fallbacks"),
    pytest.param(entry(name="Web_1"), "name 'Web_1' is not a Kubernetes pod name",
                 id="name-not-dns-subdomain"),
    pytest.param(entry(netns="relative/path"), "netns 'relative/path' must be an absolute path",
                 id="netns-relative"),
    pytest.param("web", "is a str, expected a mapping", id="entry-str"),
    pytest.param(["web"], "is a list, expected a mapping", id="entry-list"),
])
def test_bad_entry(raw: object, problem: str) -> None:
    message = one(raw)
    assert message.startswith("inv.yaml: pods[0]: ")
    assert problem in message


@pytest.mark.parametrize("uid", [
    UID_WEB,
    "1B4E28BA-2FA1-11D2-883F-0016D3CCA427",  # RFC 4122: hex is case-insensitive on input
    "d41d8cd98f00b204e9800998ecf8427e",  # a static pod: the kubelet's hash of its manifest
])
def test_pod_uids_kubernetes_gives_are_accepted_in_the_form_cgroups_carry(uid: str) -> None:
    inv = parse(yaml.safe_dump({"pods": [entry(uid=uid, namespace="kube-system",
                                               name="etcd-node-1.example")]}))
    assert list(inv.by_uid) == [uid.lower()]


def test_every_problem_listed_with_its_index() -> None:
    text = f"""\
pods:
  - {{uid: {UID_WEB}, namespace: shop, name: web}}
  - {{namespace: shop}}
  - {{uid: {UID_DB}, namespace: shop, name: db, colour: red, labels: [a]}}
  - just a string
"""
    with pytest.raises(InventoryError) as info:
        parse(text, "inv.yaml")
    assert str(info.value) == (
        "inv.yaml: "
        "pods[1]: 'name' must be a non-empty string; "
        "pods[1]: needs 'uid' or 'netns' to be matched to a pod network; "
        "pods[2]: unknown keys ['colour'] (known: ['labels', 'name', 'namespace', 'netns', "
        "'owner', 'uid']); "
        "pods[2]: 'labels' must map strings to strings; "
        "pods[3]: is a str, expected a mapping")


def test_duplicate_uid() -> None:
    text = f"""\
pods:
  - {{uid: {UID_WEB}, namespace: shop, name: web}}
  - {{uid: {UID_DB}, namespace: shop, name: db}}
  - {{uid: {UID_WEB}, namespace: shop, name: web-again}}
"""
    with pytest.raises(InventoryError, match=rf"^inv: pods\[2\]: uid {UID_WEB} is listed twice$"):
        parse(text, "inv")


def test_duplicate_netns() -> None:
    text = """\
pods:
  - {netns: /run/netns/a, namespace: shop, name: web}
  - {netns: /run/netns/a, namespace: shop, name: db}
"""
    with pytest.raises(InventoryError, match=r"^inv: pods\[1\]: netns /run/netns/a is listed twice$"):
        parse(text, "inv")


def test_duplicates_and_bad_entries_all_listed() -> None:
    text = """\
pods:
  - {netns: /run/netns/a, namespace: shop, name: web}
  - {netns: /run/netns/a, namespace: shop, name: db}
  - {netns: /run/netns/b, name: db}
"""
    with pytest.raises(InventoryError) as info:
        parse(text, "inv")
    assert str(info.value) == ("inv: pods[1]: netns /run/netns/a is listed twice; "
                               "pods[2]: 'namespace' must be a non-empty string")


@pytest.mark.parametrize(("text", "problem"), [
    pytest.param("pods: [\n  - {uid: a\n", "inv: not valid YAML: ", id="not-yaml"),
    pytest.param("key: [unclosed", "inv: not valid YAML: ", id="unclosed-flow"),
    pytest.param("- uid: a\n  namespace: b\n  name: c\n", "inv: expected a mapping with a 'pods' list",
                 id="top-level-list"),
    pytest.param("just words\n", "inv: expected a mapping with a 'pods' list", id="top-level-str"),
    pytest.param("pods: {uid: a}\n", "inv: expected a mapping with a 'pods' list", id="pods-mapping"),
    pytest.param("pods: 3\n", "inv: expected a mapping with a 'pods' list", id="pods-int"),
])
def test_bad_document(text: str, problem: str) -> None:
    with pytest.raises(InventoryError) as info:
        parse(text, "inv")
    assert str(info.value).startswith(problem)


@pytest.mark.parametrize("text", ["", "# nothing yet\n"], ids=["empty", "comments-only"])
def test_empty_file_is_refused(text: str) -> None:
    with pytest.raises(InventoryError, match=r"^inv: "):
        parse(text, "inv")


def test_mapping_without_pods_key_is_refused() -> None:
    with pytest.raises(InventoryError, match=r"^inv: "):
        parse(f"pod:\n  - {{uid: {UID_WEB}, namespace: shop, name: web}}\n", "inv")


@pytest.mark.parametrize("raw", [entry(labels=[]), entry(labels=""), entry(owner=0)],
                         ids=["labels-empty-list", "labels-empty-str", "owner-zero"])
def test_falsy_wrong_types_are_refused(raw: dict[str, object]) -> None:
    one(raw)


def test_load_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("pods:\n  - {namespace: shop}\n")
    with pytest.raises(InventoryError, match=rf"^{re.escape(str(path))}: pods\[0\]: 'name' must be"):
        load(str(path))


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    expected = rf"^{re.escape(str(path))}: cannot read: No such file or directory$"
    with pytest.raises(InventoryError, match=expected):
        load(str(path))


# -- StaticInventory ------------------------------------------------------------------------------

def write(path: Path, text: str, mtime_s: int) -> None:
    """Write and stamp the file with a chosen mtime, so a change is always visible."""
    path.write_text(text)
    os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))


@pytest.fixture
def inv_file(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    write(path, GOOD, 1_700_000_000)
    return path


def test_lookup(inv_file: Path) -> None:
    source = StaticInventory(str(inv_file))
    assert source.lookup(UID_WEB, []) == WEB
    assert source.lookup(None, ["/run/netns/cni-7f3c"]) == DB
    assert source.lookup("", ["/run/netns/nope", "/run/netns/cni-both"]) == DNS
    assert source.lookup("00000000-0000-0000-0000-000000000000", ["/run/netns/nope"]) is None
    assert source.lookup(None, []) is None


def test_lookup_uid_wins_over_netns(inv_file: Path) -> None:
    source = StaticInventory(str(inv_file))
    assert source.lookup(UID_WEB, ["/run/netns/cni-7f3c"]) == WEB
    # an unknown UID falls back to the netns path
    assert source.lookup("00000000-0000-0000-0000-000000000000", ["/run/netns/cni-7f3c"]) == DB


def test_lookup_through_a_symlinked_path(tmp_path: Path) -> None:
    (tmp_path / "run" / "netns").mkdir(parents=True)
    (tmp_path / "run" / "netns" / "cni-a").write_text("")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to(tmp_path / "run")
    path = tmp_path / "inv.yaml"
    write(path, f"pods:\n  - {{netns: {tmp_path}/run/netns/cni-a, namespace: shop, name: db-0}}\n", 1)
    source = StaticInventory(str(path))
    assert source.lookup(None, [f"{tmp_path}/var/run/netns/cni-a"]) == DB


def test_inventory_key_through_a_symlinked_path(tmp_path: Path) -> None:
    (tmp_path / "run" / "netns").mkdir(parents=True)
    (tmp_path / "run" / "netns" / "cni-a").write_text("")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to(tmp_path / "run")
    path = tmp_path / "inv.yaml"
    write(path, f"pods:\n  - {{netns: {tmp_path}/var/run/netns/cni-a, namespace: shop, name: db-0}}\n",
          1)
    source = StaticInventory(str(path))
    assert source.lookup(None, [f"{tmp_path}/run/netns/cni-a"]) == DB


def test_bad_file_at_start_raises(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    write(path, "pods:\n  - {namespace: shop, name: web}\n", 1)
    with pytest.raises(InventoryError, match=r"pods\[0\]: needs 'uid' or 'netns'"):
        StaticInventory(str(path))


def test_missing_file_at_start_raises(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read"):
        StaticInventory(str(tmp_path / "missing.yaml"))


def test_refresh_keeps_last_good_then_picks_up_a_good_change(inv_file: Path) -> None:
    source = StaticInventory(str(inv_file))
    write(inv_file, "pods:\n  - {namespace: shop}\n", 1_700_000_100)
    source.refresh()
    assert source.lookup(UID_WEB, []) == WEB  # the bad version is refused, the good one stays

    write(inv_file, f"pods:\n  - {{uid: {UID_WEB}, namespace: shop, name: web-new}}\n", 1_700_000_200)
    source.refresh()
    assert source.lookup(UID_WEB, []) == PodMeta("shop", "web-new", uid=UID_WEB)
    assert source.lookup(None, ["/run/netns/cni-7f3c"]) is None  # gone with the old version


def test_changed_says_whether_a_refresh_would_reread(inv_file: Path) -> None:
    source = StaticInventory(str(inv_file))
    assert not source.changed()
    write(inv_file, f"pods:\n  - {{uid: {UID_WEB}, namespace: shop, name: web-new}}\n", 1_700_000_200)
    assert source.changed() and source.changed()  # asking reads nothing and changes nothing
    source.refresh()
    assert not source.changed()
    inv_file.unlink()
    assert source.changed()


def test_refresh_keeps_last_good_when_the_file_goes(inv_file: Path) -> None:
    source = StaticInventory(str(inv_file))
    inv_file.unlink()
    source.refresh()
    assert source.lookup(UID_WEB, []) == WEB
    write(inv_file, f"pods:\n  - {{uid: {UID_DB}, namespace: db, name: pg-0}}\n", 1_700_000_300)
    source.refresh()
    assert source.lookup(UID_DB, []) == PodMeta("db", "pg-0", uid=UID_DB)
    assert source.lookup(UID_WEB, []) is None


def test_refresh_sees_a_replaced_file_with_the_same_size_and_mtime(inv_file: Path) -> None:
    source = StaticInventory(str(inv_file))
    tmp = inv_file.with_suffix(".tmp")
    write(tmp, GOOD.replace("web-7c9f-abcde", "web-7c9f-zzzzz"), 1_700_000_000)
    os.replace(tmp, inv_file)  # same size, same mtime, new inode: how editors and the lab save
    source.refresh()
    assert source.lookup(UID_WEB, []) == PodMeta(
        "shop", "web-7c9f-zzzzz", uid=UID_WEB, labels=WEB.labels, workload="web",
        workload_kind="Deployment")


def test_refresh_does_not_reread_an_unchanged_file(inv_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    source = StaticInventory(str(inv_file))

    def no_load(path: str) -> None:
        raise AssertionError(f"re-read {path} though it did not change")

    monkeypatch.setattr(static, "load", no_load)
    source.refresh()
    source.refresh()
    assert source.lookup(UID_WEB, []) == WEB


def test_no_metadata() -> None:
    source = NoMetadata()
    source.refresh()
    assert source.lookup(UID_WEB, ["/run/netns/cni-7f3c"]) is None
