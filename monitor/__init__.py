"""podnetmon: per-pod network monitor for Kubernetes nodes, on BCC eBPF."""

__version__ = "0.1.0"
