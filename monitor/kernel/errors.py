"""What the kernel side raises: each error names the probe, interface or netns it is about."""

from __future__ import annotations


class KernelError(Exception):
    """A kernel operation failed; says which probe, interface and netns it was for."""

    def __init__(self, message: str, *, probe: str = "", interface: str = "",
                 netns: int | None = None, err: int | None = None) -> None:
        self.probe, self.interface, self.netns, self.errno = probe, interface, netns, err
        where = ", ".join(f"{k}={v}" for k, v in (("probe", probe), ("interface", interface),
                                                   ("netns", netns)) if v)
        super().__init__(f"{message} ({where})" if where else message)


class CompileError(KernelError):
    """The BPF programs did not compile or did not pass the verifier: fatal at start-up."""


class AttachError(KernelError):
    """Attaching to one interface failed: logged, counted and retried, never fatal."""
