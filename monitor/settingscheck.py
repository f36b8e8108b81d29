"""What makes a setting's value bad: every problem with a Settings, each naming its setting
first. The daemon's own settings are checked here; the settings a probe owns, as the probe
says (monitor.probes.base.Setting.check).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING

from monitor.probes import REGISTRY

if TYPE_CHECKING:
    from monitor.settings import CoreSettings

ATTACH_MODES = ("auto", "tc", "tcx")
METADATA_SOURCES = ("auto", "kubernetes", "inventory", "none")
AUTH_MODES = ("auto", "token", "kubernetes", "none")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


def problems(s: CoreSettings) -> list[str]:
    """Every problem with these settings, each naming its setting first; none: [].

    All are listed, not the first: someone fixing a manifest should not have to start
    the daemon once per mistake (`run` exits 2 with the whole list)."""
    found: list[str] = []
    bad = found.append
    _host, sep, port = s.listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        bad(f"listen: {s.listen!r} is not host:port (e.g. 0.0.0.0:9655)")
    if s.metadata not in METADATA_SOURCES:
        bad(f"metadata: {s.metadata!r} is not one of {', '.join(METADATA_SOURCES)}")
    if s.metadata == "inventory" and not s.inventory:
        bad("metadata: inventory needs --inventory PATH")
    if not 1 <= s.max_pods <= 100000:
        bad(f"max_pods: {s.max_pods} is outside 1..100000")
    names: dict[str, str] = {}
    for label in s.pod_labels:
        if not label or len(label) > 317:
            bad(f"pod_labels: {label!r} is not a Kubernetes label key")
        other = names.setdefault(prometheus_label(label), label)
        if other != label:
            bad(f"pod_labels: {other!r} and {label!r} would both be exported "
                f"as {prometheus_label(label)}")
    if s.auth not in AUTH_MODES:
        bad(f"auth: {s.auth!r} is not one of {', '.join(AUTH_MODES)}")
    if s.auth == "token" and not s.auth_token_file:
        bad("auth: token needs --auth-token-file PATH")
    if s.attach_mode not in ATTACH_MODES:
        bad(f"attach_mode: {s.attach_mode!r} is not one of {', '.join(ATTACH_MODES)}")
    if s.log_format not in LOG_FORMATS:
        bad(f"log_format: {s.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    if s.log_level not in LOG_LEVELS:
        bad(f"log_level: {s.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if not 0 <= s.tcx_move_after <= 86400:
        bad(f"tcx_move_after: {s.tcx_move_after} s is outside 0..86400")
    if not 1 <= s.tc_priority <= 0xFFFF:
        bad(f"tc_priority: {s.tc_priority} is outside 1..65535")
    if not 1 <= s.tc_handle <= 0xFFFFFFFF:
        bad(f"tc_handle: {s.tc_handle} is outside 1..0xffffffff")
    if not 0.1 <= s.resync_interval <= 3600:
        bad(f"resync_interval: {s.resync_interval} s is outside 0.1..3600")
    if not 0 <= s.event_debounce <= 1:
        bad(f"event_debounce: {s.event_debounce} s is outside 0..1")
    if not 1 <= s.bypass_check_interval <= 3600:
        bad(f"bypass_check_interval: {s.bypass_check_interval} s is outside 1..3600")
    if not 0.1 <= s.sweep_interval <= 60:
        bad(f"sweep_interval: {s.sweep_interval} s is outside 0.1..60")
    if not 16 <= s.max_interfaces <= 65536:
        bad(f"max_interfaces: {s.max_interfaces} is outside 16..65536")
    if not s.pause_comm or len(s.pause_comm) > 15:
        bad("pause_comm: must be 1 to 15 characters (the kernel's comm length)")
    for name in ("proc_root", "bpffs_root", "tracefs_root", "btf_path"):
        if name == "bpffs_root" and not s.bpffs_root:
            continue  # empty: pin nothing (see the field)
        if not os.path.isabs(getattr(s, name)):
            bad(f"{name}: {getattr(s, name)!r} must be an absolute path")
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        bad("tls_cert_file and tls_key_file: give both or neither")
    if s.tls_client_ca_file and not s.tls_cert_file:
        bad("tls_client_ca_file: client certificates need TLS "
            "(--tls-cert-file and --tls-key-file)")
    if not 1 <= s.http_max_connections <= 65536:
        bad(f"http_max_connections: {s.http_max_connections} is outside 1..65536")
    if not 1 <= s.http_workers <= 256:
        bad(f"http_workers: {s.http_workers} is outside 1..256")
    for name in ("http_header_timeout", "http_idle_timeout", "http_body_timeout",
                 "http_write_timeout"):
        if not 0.1 <= getattr(s, name) <= 3600:
            bad(f"{name}: {getattr(s, name)} s is outside 0.1..3600")
    if not 1 <= s.auth_failures_per_minute <= 100000:
        bad(f"auth_failures_per_minute: {s.auth_failures_per_minute} is "
            "outside 1..100000")
    if not 1 <= s.auth_max_reviews <= 256:
        bad(f"auth_max_reviews: {s.auth_max_reviews} is outside 1..256")
    if not s.auth_audiences:
        bad("auth_audiences: name at least one audience (a token meant for "
            "any audience would be one meant for the API server)")
    for name in ("netns_dirs", "runtime_dirs"):
        for d in getattr(s, name):
            if not os.path.isabs(d):
                bad(f"{name}: {d!r} must be an absolute path")
    values = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    for f in dataclasses.fields(s):  # the settings the probes own, checked as they say
        setting = f.metadata.get("setting")
        if setting is not None:
            found += setting.check(f.name, values[f.name], values)
    unknown = [p for p in s.probes if p not in REGISTRY]
    if unknown:
        bad(f"probes: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
            f"{'a probe' if len(unknown) == 1 else 'probes'}; known: {', '.join(REGISTRY)}")
    return found


def prometheus_label(key: str) -> str:
    """A Kubernetes label key as a Prometheus label name: label_<key>, [^a-zA-Z0-9_] -> _."""
    return "label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


