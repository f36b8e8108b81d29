"""What the daemon's settings stand for at start-up: the metadata source, the cluster's
peer index, the authenticator, TLS and the HTTP limits.

Everything here is built before the kernel is touched; a ConfigError (or a bad
inventory, an unknown probe) is exit 2 with the reason, having changed nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from monitor.auth import Authenticator, NoAuth, authenticator
from monitor.listener import Limits
from monitor.metadata import MetadataSource
from monitor.metadata.static import NoMetadata, StaticInventory
from monitor.probes import needing
from monitor.probes.base import PEER_RESOLVER, Probe
from monitor.settings import Settings
from monitor.tls import TlsError, TlsFiles


@runtime_checkable
class KubernetesLike(Protocol):
    """A metadata source with a thread of its own (monitor.metadata.kubernetes)."""

    on_change: Callable[[], None]

    def start(self) -> None: ...
    def stop(self) -> None: ...


class ConfigError(ValueError):
    """The metadata source cannot be set up as configured."""


def metadata_mode(settings: Settings, environ: Mapping[str, str]) -> str:
    """The metadata source `auto` stands for here."""
    if settings.metadata != "auto":
        return settings.metadata
    if settings.inventory:
        return "inventory"
    if settings.kubeconfig or environ.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    return "none"


def metadata_source(settings: Settings) -> MetadataSource:
    mode = metadata_mode(settings, os.environ)
    if mode == "inventory":
        return StaticInventory(settings.inventory)
    if mode == "kubernetes":
        from monitor.metadata import kubernetes

        try:
            api = kubernetes.api_client(settings.kubeconfig)
        except Exception as exc:  # noqa: BLE001 - the client's config errors have no common base
            raise ConfigError(f"cannot configure the Kubernetes client: {exc}") from None
        return kubernetes.KubernetesSource(api, settings.node_name, label_allow=settings.pod_labels)
    return NoMetadata()


def cluster_index(settings: Settings, metadata: MetadataSource, probes: Sequence[Probe]) -> Any:
    """The cluster-wide peer index (not started), or None: see --peer-index."""
    mode = settings.peer_index
    if mode == "auto":
        mode = "cluster" if isinstance(metadata, KubernetesLike) else "none"
    if mode == "none" or not needing(probes, PEER_RESOLVER):
        return None
    from monitor.metadata import kubernetes
    from monitor.peers.cluster import ClusterIndex

    api = getattr(metadata, "api", None)
    if api is None:
        try:
            api = kubernetes.api_client(settings.kubeconfig)
        except Exception as exc:  # noqa: BLE001 - the client's config errors have no common base
            raise ConfigError(f"--peer-index cluster: cannot configure the Kubernetes client: "
                              f"{exc}") from None
    return ClusterIndex(api)


def tls_files(settings: Settings) -> TlsFiles | None:
    if not settings.tls_cert_file:
        return None
    try:
        return TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    except TlsError as exc:
        raise ConfigError(str(exc)) from None


def http_limits(settings: Settings) -> Limits:
    return Limits(max_connections=settings.http_max_connections, workers=settings.http_workers,
                  header_timeout=settings.http_header_timeout,
                  idle_timeout=settings.http_idle_timeout,
                  body_timeout=settings.http_body_timeout,
                  write_timeout=settings.http_write_timeout)


def chosen_authenticator(settings: Settings) -> Authenticator:
    def api_client() -> Any:
        from monitor.metadata import kubernetes

        return kubernetes.api_client(settings.kubeconfig).api_client

    try:
        chosen = authenticator(settings.auth, token_file=settings.auth_token_file,
                               api_client_factory=api_client, audiences=settings.auth_audiences,
                               max_reviews=settings.auth_max_reviews)
    except Exception as exc:  # noqa: BLE001 - the client's config errors have no common base
        raise ConfigError(f"cannot set up authentication: {exc}") from None
    if settings.auth_metrics and isinstance(chosen, NoAuth):
        raise ConfigError("auth_metrics needs an authenticator (--auth token or kubernetes): "
                          "with none, nobody could scrape")
    return chosen
