"""Settings: defaults, precedence (flag > env > default), conversion and validation."""

from __future__ import annotations

import argparse
import socket

import pytest

from monitor import settings
from monitor.settings import Settings, SettingsError, from_sources

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture(autouse=True)
def fixed_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "host-from-gethostname")


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    s = from_sources({}, environ={})
    assert s.listen == "0.0.0.0:9655"
    assert (s.listen_host, s.listen_port) == ("0.0.0.0", 9655)
    assert s.node_name == "host-from-gethostname"
    assert s.proc_root == "/proc"
    assert s.netns_dirs == ("/run/netns", "/var/run/netns")
    assert s.bpffs_root == "/sys/fs/bpf"
    assert s.tracefs_root == "/sys/kernel/tracing"
    assert s.pause_comm == "pause"
    assert s.inventory == ""
    assert s.attach_mode == "auto"
    assert s.tc_priority == 4096
    assert s.tc_handle == 0x504E
    assert s.resync_interval == 30.0
    assert s.event_debounce == 0.05
    assert s.max_interfaces == 1024
    assert s.btf_path == "/sys/kernel/btf/vmlinux"
    assert s.tcp_connect_timeout == 5.0
    assert s.dns_timeout == 5.0
    assert s.sweep_interval == 1.0
    assert s.bpf_stats is False
    assert s.probes == ()
    assert s.log_level == "info"
    assert s.log_format == "auto"
    assert s.metadata == "auto"
    assert s.kubeconfig == ""
    assert s.pod_labels == ()
    assert s.max_pods == 1000
    assert s.runtime_dirs == ("/run/containerd/io.containerd.runtime.v2.task/k8s.io",
                              "/run/containers/storage/overlay-containers",
                              "/var/lib/containers/storage/overlay-containers")
    assert (s.auth, s.auth_token_file) == ("auto", "")
    assert s.capture_dir == "/var/lib/podnetmon/captures"
    assert (s.capture_max_files, s.capture_max_bytes) == (20, 500 << 20)
    assert (s.trace_max_duration, s.trace_max_packets, s.trace_max_bytes) == (300.0, 1_000_000, 1 << 30)
    assert (s.trace_snaplen, s.trace_max_snaplen) == (1500, 65000)
    assert (s.traces_per_node, s.traces_per_pod) == (4, 2)


def test_defaults_from_an_empty_command_line() -> None:
    assert from_sources(parse_flags(), environ={}) == Settings()


def test_os_environ_is_read_when_no_environ_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PODNETMON_TC_PRIORITY", "77")
    assert from_sources({}).tc_priority == 77


def test_flag_beats_env_beats_default() -> None:
    env = {"PODNETMON_TC_PRIORITY": "100", "PODNETMON_LOG_LEVEL": "debug",
           "PODNETMON_PAUSE_COMM": "infra"}
    s = from_sources(parse_flags("--tc-priority", "200", "--log-level", "warning"), environ=env)
    assert s.tc_priority == 200  # flag over env
    assert s.log_level == "warning"  # flag over env
    assert s.pause_comm == "infra"  # env over default
    assert s.max_interfaces == 1024  # default


def test_overrides_beat_everything() -> None:
    s = from_sources({"tc_priority": "5"}, environ={"PODNETMON_TC_PRIORITY": "6"},
                     overrides={"tc_priority": 7})
    assert s.tc_priority == 7


@pytest.mark.parametrize(("flags", "env", "expected"), [
    pytest.param({}, {"NODE_NAME": "node-downward"}, "node-downward", id="NODE_NAME"),
    pytest.param({}, {"NODE_NAME": "node-downward", "PODNETMON_NODE_NAME": "node-ours"}, "node-ours",
                 id="PODNETMON_NODE_NAME-wins"),
    pytest.param({"node_name": "node-flag"}, {"NODE_NAME": "node-downward"}, "node-flag",
                 id="flag-wins"),
    pytest.param({}, {"NODE_NAME": ""}, "host-from-gethostname", id="empty-NODE_NAME"),
    pytest.param({}, {}, "host-from-gethostname", id="hostname"),
])
def test_node_name(flags: dict[str, str], env: dict[str, str], expected: str) -> None:
    assert from_sources(flags, environ=env).node_name == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", False),
])
def test_bool_conversion(raw: str, expected: bool) -> None:
    assert from_sources({}, environ={"PODNETMON_BPF_STATS": raw}).bpf_stats is expected


@pytest.mark.parametrize(("raw", "expected"), [("4096", 4096), ("0x100", 256), ("0o20", 16),
                                              ("0b10000", 16), (" 32 ", 32)])
def test_int_conversion(raw: str, expected: int) -> None:
    assert from_sources({"max_interfaces": raw}, environ={}).max_interfaces == expected


def test_int_hex_handle() -> None:
    assert from_sources(parse_flags("--tc-handle", "0xBEEF"), environ={}).tc_handle == 0xBEEF


def test_float_conversion() -> None:
    s = from_sources({"resync_interval": "2.5"}, environ={"PODNETMON_EVENT_DEBOUNCE": "0"})
    assert (s.resync_interval, s.event_debounce) == (2.5, 0.0)


def test_tuple_conversion() -> None:
    s = from_sources({"netns_dirs": " /a/netns, /b/netns ,,"}, environ={"PODNETMON_PROBES": "packets"})
    assert s.netns_dirs == ("/a/netns", "/b/netns")
    assert s.probes == ("packets",)
    assert from_sources({"probes": ""}, environ={}).probes == ()


def test_non_string_values_pass_through() -> None:
    s = from_sources({"tc_priority": 9, "netns_dirs": ("/x",)}, environ={})
    assert (s.tc_priority, s.netns_dirs) == (9, ("/x",))


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("bpf_stats", "maybe", "bpf_stats: 'maybe' is not a valid bool"),
    ("max_interfaces", "lots", "max_interfaces: 'lots' is not a valid int"),
    ("tc_priority", "1.5", "tc_priority: '1.5' is not a valid int"),
    ("resync_interval", "soon", "resync_interval: 'soon' is not a valid float"),
])
def test_conversion_errors_name_the_setting(name: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        from_sources({}, environ={settings.env_name(name): raw})
    assert str(info.value) == message


@pytest.mark.parametrize(("field", "value", "prefix"), [
    ("listen", "0.0.0.0", "listen: "),
    ("listen", "0.0.0.0:", "listen: "),
    ("listen", "nope", "listen: "),
    ("listen", "0.0.0.0:65536", "listen: "),
    ("listen", "0.0.0.0:-1", "listen: "),
    ("listen", "0.0.0.0:http", "listen: "),
    ("attach_mode", "bogus", "attach_mode: 'bogus' is not one of auto, tc, tcx"),
    ("log_format", "xml", "log_format: 'xml' is not one of auto, json, console"),
    ("log_level", "trace", "log_level: 'trace' is not one of debug, info, warning, error"),
    ("tc_priority", 0, "tc_priority: 0 is outside 1..65535"),
    ("tc_priority", 65536, "tc_priority: 65536 is outside 1..65535"),
    ("tc_handle", 0, "tc_handle: "),
    ("resync_interval", 0.05, "resync_interval: 0.05 s is outside 0.1..3600"),
    ("resync_interval", 3601.0, "resync_interval: 3601.0 s is outside 0.1..3600"),
    ("resync_interval", float("nan"), "resync_interval: "),
    ("event_debounce", 1.5, "event_debounce: "),
    ("max_interfaces", 8, "max_interfaces: "),
    ("pause_comm", "", "pause_comm: "),
    ("pause_comm", "a" * 16, "pause_comm: must be 1 to 15 characters"),
    ("proc_root", "proc", "proc_root: 'proc' must be an absolute path"),
    ("bpffs_root", "bpf", "bpffs_root: "),
    ("tracefs_root", "", "tracefs_root: "),
    ("netns_dirs", ("/run/netns", "var/run/netns"), "netns_dirs: 'var/run/netns' must be an absolute"),
    ("btf_path", "vmlinux", "btf_path: 'vmlinux' must be an absolute path"),
    ("tcp_connect_timeout", 0.05, "tcp_connect_timeout: 0.05 s is outside 0.1..600"),
    ("tcp_connect_timeout", 601.0, "tcp_connect_timeout: 601.0 s is outside 0.1..600"),
    ("tcp_connect_timeout", float("nan"), "tcp_connect_timeout: "),
    ("dns_timeout", 0.0, "dns_timeout: 0.0 s is outside 0.1..600"),
    ("dns_timeout", 1000.0, "dns_timeout: 1000.0 s is outside 0.1..600"),
    ("sweep_interval", 0.01, "sweep_interval: 0.01 s is outside 0.1..60"),
    ("sweep_interval", 61.0, "sweep_interval: 61.0 s is outside 0.1..60"),
    ("tcx_move_after", -1.0, "tcx_move_after: -1.0 s is outside 0..86400"),
    ("metadata", "api", "metadata: 'api' is not one of auto, kubernetes, inventory, none"),
    ("metadata", "inventory", "metadata: inventory needs --inventory PATH"),
    ("max_pods", 0, "max_pods: 0 is outside 1..100000"),
    ("max_pods", 100001, "max_pods: 100001 is outside 1..100000"),
    ("pod_labels", ("app", ""), "pod_labels: '' is not a Kubernetes label key"),
    ("pod_labels", ("a" * 318,), "pod_labels: 'aaaa"),
    ("runtime_dirs", ("/run/containerd", "run/crio"), "runtime_dirs: 'run/crio' must be an absolute"),
    ("auth", "basic", "auth: 'basic' is not one of auto, token, kubernetes, none"),
    ("auth", "token", "auth: token needs --auth-token-file PATH"),
    ("capture_dir", "captures", "capture_dir: 'captures' must be an absolute path"),
    ("capture_max_files", 0, "capture_max_files: 0 must be at least 1"),
    ("capture_max_bytes", 0, "capture_max_bytes: 0 must be at least 1"),
    ("trace_max_duration", 0.0, "trace_max_duration: 0.0 s is outside (0, 86400]"),
    ("trace_max_duration", 86401.0, "trace_max_duration: 86401.0 s is outside (0, 86400]"),
    ("trace_max_packets", 0, "trace_max_packets: 0 must be at least 1"),
    ("trace_max_bytes", -1, "trace_max_bytes: -1 must be at least 1"),
    ("trace_snaplen", 13, "trace_snaplen and trace_max_snaplen: "),
    ("trace_snaplen", 65001, "trace_snaplen and trace_max_snaplen: "),
    ("trace_max_snaplen", 65001, "trace_snaplen and trace_max_snaplen: "),
    ("trace_max_snaplen", 1000, "trace_snaplen and trace_max_snaplen: "),  # below the default snaplen
    ("traces_per_node", 0, "traces_per_node: 0 must be at least 1"),
    ("traces_per_pod", 0, "traces_per_pod: 0 must be at least 1"),
])
def test_validation_errors_name_the_setting(field: str, value: object, prefix: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings(**{field: value})  # type: ignore[arg-type]
    assert str(info.value).startswith(prefix)


@pytest.mark.parametrize(("field", "value"), [
    ("listen", "127.0.0.1:0"), ("listen", "[::1]:65535"), ("tc_priority", 1), ("tc_priority", 65535),
    ("resync_interval", 0.1), ("resync_interval", 3600.0), ("pause_comm", "a" * 15),
    ("event_debounce", 0.0), ("max_interfaces", 16), ("max_interfaces", 65536),
    ("tcp_connect_timeout", 0.1), ("tcp_connect_timeout", 600.0), ("dns_timeout", 0.1),
    ("dns_timeout", 600.0), ("sweep_interval", 0.1), ("sweep_interval", 60.0), ("tcx_move_after", 0.0),
    ("btf_path", "/boot/vmlinux.btf"), ("max_pods", 1), ("max_pods", 100000),
    ("pod_labels", ("a" * 317,)), ("metadata", "none"), ("metadata", "kubernetes"),
    ("runtime_dirs", ()), ("auth", "none"), ("auth", "kubernetes"), ("capture_max_files", 1),
    ("trace_max_duration", 86400.0), ("trace_snaplen", 14), ("trace_max_snaplen", 65000),
    ("traces_per_pod", 1),
])
def test_edges_accepted(field: str, value: object) -> None:
    assert getattr(Settings(**{field: value}), field) == value  # type: ignore[arg-type]


def test_an_empty_bpffs_root_pins_nothing_by_flag_or_by_env() -> None:
    # documented as "empty: pin nothing"; the daemon then runs with maps_state unpinned
    assert from_sources(parse_flags("--bpffs-root", ""), environ={}).bpffs_root == ""
    assert Settings(bpffs_root="").bpffs_root == ""
    # an empty variable is a value for this one setting (a DaemonSet's only way to say it)...
    assert from_sources({}, environ={"PODNETMON_BPFFS_ROOT": ""}).bpffs_root == ""
    # ... and for no other: an empty variable still means the default
    env = {"PODNETMON_TRACEFS_ROOT": "", "PODNETMON_NETNS_DIRS": "", "PODNETMON_LISTEN": ""}
    s = from_sources({}, environ=env)
    assert (s.tracefs_root, s.netns_dirs, s.listen) == (
        "/sys/kernel/tracing", ("/run/netns", "/var/run/netns"), "0.0.0.0:9655")
    assert {"bpffs_root"} == settings.EMPTY_ENV_IS_A_VALUE


def test_every_problem_is_listed_not_just_the_first() -> None:
    with pytest.raises(SettingsError) as info:
        Settings(listen="nope", attach_mode="bogus", tc_priority=0, proc_root="proc")
    assert [p.split(":")[0] for p in info.value.problems] == [
        "listen", "attach_mode", "tc_priority", "proc_root"]
    assert str(info.value) == "; ".join(info.value.problems)


def test_unreadable_values_and_bad_values_are_reported_together() -> None:
    env = {"PODNETMON_TRACE_SNAPLEN": "big", "PODNETMON_MAX_INTERFACES": "8"}
    with pytest.raises(SettingsError) as info:
        from_sources({"trace_max_snaplen": "1000", "log_level": "loud"}, environ=env)
    # trace_snaplen could not be read: the check of it with trace_max_snaplen (against the
    # default 1500 nobody gave) is left out; every other problem is there
    assert info.value.problems == [
        "trace_snaplen: 'big' is not a valid int",
        "log_level: 'loud' is not one of debug, info, warning, error",
        "max_interfaces: 8 is outside 16..65536",
    ]


def test_unknown_probes_are_a_bad_setting_and_the_help_lists_every_probe() -> None:
    from monitor.probes import REGISTRY

    with pytest.raises(SettingsError, match=r"^probes: tracing, pakets are not probes; known: "):
        Settings(probes=("packets", "tracing", "pakets"))
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    help_text = next(a.help for a in parser._actions if "--probes" in a.option_strings) or ""
    assert "run --help" not in help_text  # it is the page the reader is on
    for name, probe in REGISTRY.items():
        assert f"{name}: {probe.summary}" in help_text
    assert "Without `trace`" in help_text and "404" in help_text


def test_validation_error_through_env() -> None:
    with pytest.raises(SettingsError, match=r"^attach_mode: 'tcz'"):
        from_sources({}, environ={"PODNETMON_ATTACH_MODE": "tcz"})


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("127.0.0.1:8080", "127.0.0.1", 8080),
    ("[::1]:9655", "::1", 9655),
    (":9000", "0.0.0.0", 9000),
])
def test_listen_host_and_port(listen: str, host: str, port: int) -> None:
    s = Settings(listen=listen)
    assert (s.listen_host, s.listen_port) == (host, port)


def test_add_arguments_one_flag_per_field() -> None:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings} - {"-h", "--help"}
    assert flags == {
        "--listen", "--node-name", "--proc-root", "--netns-dirs", "--bpffs-root",
        "--tracefs-root", "--pause-comm", "--inventory", "--attach-mode", "--tcx-move-after",
        "--tc-priority",
        "--tc-handle", "--resync-interval", "--event-debounce", "--max-interfaces", "--bpf-stats",
        "--probes", "--log-level", "--log-format", "--btf-path", "--tcp-connect-timeout",
        "--dns-timeout", "--sweep-interval", "--metadata", "--kubeconfig", "--pod-labels",
        "--max-pods", "--runtime-dirs", "--auth", "--auth-audiences", "--auth-token-file", "--capture-dir",
        "--capture-max-files", "--capture-max-bytes", "--trace-max-duration", "--trace-max-packets",
        "--trace-max-bytes", "--trace-snaplen", "--trace-max-snaplen", "--traces-per-node",
        "--traces-per-pod", "--bypass-check-interval", "--leave-attached", "--tls-cert-file",
            "--tls-key-file", "--tls-client-ca-file", "--allow-insecure-auth", "--auth-metrics",
            "--http-max-connections", "--http-workers", "--http-header-timeout",
            "--http-idle-timeout", "--http-body-timeout", "--http-write-timeout",
            "--auth-failures-per-minute", "--auth-max-reviews", "--peer-top", "--peer-ttl",
            "--peer-interval", "--cluster-cidrs", "--service-cidrs", "--peer-index",
            "--dns-top"}
    assert len(flags) == len(settings.names())


def test_flags_default_to_none_and_name_their_env() -> None:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    assert all(v is None for v in vars(parser.parse_args([])).values())
    tc = next(a for a in parser._actions if "--tc-priority" in a.option_strings)
    assert "PODNETMON_TC_PRIORITY" in (tc.help or "")
    assert "4096" in (tc.help or "")


def test_names_and_env_names() -> None:
    assert settings.flag_name("netns_dirs") == "--netns-dirs"
    assert settings.env_name("netns_dirs") == "PODNETMON_NETNS_DIRS"
    assert settings.names()[:2] == ["listen", "node_name"]


def test_describe_is_plain_data() -> None:
    d = settings.describe(Settings(node_name="n1", probes=("packets",)))
    assert d["node_name"] == "n1"
    assert d["probes"] == ("packets",)
    assert d["tc_handle"] == 0x504E


def test_new_settings_from_env_and_flags() -> None:
    s = from_sources(parse_flags("--tcp-connect-timeout", "2.5", "--btf-path", "/tmp/vmlinux"),
                     environ={"PODNETMON_DNS_TIMEOUT": "3", "PODNETMON_SWEEP_INTERVAL": "0.5",
                              "PODNETMON_TCP_CONNECT_TIMEOUT": "9"})
    assert (s.tcp_connect_timeout, s.dns_timeout, s.sweep_interval) == (2.5, 3.0, 0.5)
    assert s.btf_path == "/tmp/vmlinux"


def test_metadata_settings_from_env_and_flags() -> None:
    s = from_sources(parse_flags("--metadata", "kubernetes", "--pod-labels", "app, app.kubernetes.io/name,,"),
                     environ={"PODNETMON_KUBECONFIG": "/etc/kube/config", "PODNETMON_MAX_PODS": "250",
                              "PODNETMON_RUNTIME_DIRS": "/run/a,/run/b", "PODNETMON_METADATA": "none"})
    assert s.metadata == "kubernetes"  # the flag over the env
    assert s.pod_labels == ("app", "app.kubernetes.io/name")
    assert s.kubeconfig == "/etc/kube/config"
    assert s.max_pods == 250
    assert s.runtime_dirs == ("/run/a", "/run/b")


def test_trace_settings_from_env_and_flags() -> None:
    s = from_sources(parse_flags("--auth", "token", "--auth-token-file", "/etc/podnetmon/token",
                                 "--trace-snaplen", "96", "--traces-per-pod", "1"),
                     environ={"PODNETMON_CAPTURE_DIR": "/data/captures",
                              "PODNETMON_TRACE_MAX_DURATION": "60", "PODNETMON_TRACES_PER_POD": "3",
                              "PODNETMON_CAPTURE_MAX_BYTES": "1048576"})
    assert (s.auth, s.auth_token_file) == ("token", "/etc/podnetmon/token")
    assert (s.trace_snaplen, s.traces_per_pod) == (96, 1)  # the flag over the env
    assert (s.capture_dir, s.trace_max_duration, s.capture_max_bytes) == ("/data/captures", 60.0, 1 << 20)


def test_inventory_mode_with_an_inventory() -> None:
    s = Settings(metadata="inventory", inventory="/etc/podnetmon/inventory.yaml")
    assert (s.metadata, s.inventory) == ("inventory", "/etc/podnetmon/inventory.yaml")


def test_pod_labels_that_collide_as_prometheus_names_are_refused() -> None:
    with pytest.raises(SettingsError, match=r"^pod_labels: "):
        Settings(pod_labels=("app-name", "app_name"))


def test_auth_audiences_default_to_podnetmon_and_take_a_list() -> None:
    assert Settings().auth_audiences == ("podnetmon",)
    s = from_sources(parse_flags("--auth-audiences", "podnetmon,netmon.example"), environ={})
    assert s.auth_audiences == ("podnetmon", "netmon.example")
    # none would mean "whatever the API server takes": its own audience, any token
    with pytest.raises(SettingsError, match=r"^auth_audiences: "):
        Settings(auth_audiences=())
