"""What this kernel and toolchain can do, tried for real: clsact, cls_bpf and tcx in a
throwaway netns, and a trivial compile with BCC (for `podnetmon check`).
"""

from __future__ import annotations

import os

from monitor.kernel import loader, netns, rtnl, syscalls
from monitor.kernel.rtnltc import TC_PARENT_INGRESS


def probe_attach_features() -> dict[str, str]:
    """Try clsact, a cls_bpf filter and a tcx link for real, in a throwaway netns.

    A forked child unshares its network namespace and works on that
    namespace's own `lo`, so nothing on the host is touched. Returns
    {"clsact": err, "cls_bpf": err, "tcx": err}, an empty string meaning it works.
    """
    import json

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        result = {"clsact": "not tried", "cls_bpf": "not tried", "tcx": "not tried"}
        try:
            netns.unshare()
            prog = syscalls.load_unspec_program()
            with rtnl.Rtnl() as tc:
                try:
                    tc.add_clsact(1)
                    result["clsact"] = ""
                    tc.add_bpf_filter(1, parent=TC_PARENT_INGRESS, prio=1, handle=1, fd=prog,
                                      name="pnm_probe", direct_action=True, classid=1)
                    result["cls_bpf"] = ""
                except OSError as exc:
                    result["clsact" if result["clsact"] else "cls_bpf"] = str(exc)
            try:
                os.close(syscalls.tcx_link_create(prog, 1, syscalls.BPF_TCX_INGRESS, first=True))
                result["tcx"] = ""
            except OSError as exc:
                result["tcx"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, whatever it is
            result = {k: str(exc) if v == "not tried" else v for k, v in result.items()}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    try:
        return dict(json.loads(b"".join(chunks) or b"{}"))
    except ValueError:
        return {"clsact": "probe crashed", "cls_bpf": "probe crashed", "tcx": "probe crashed"}


def compile_trivial() -> str:
    """Compile a trivial program with BCC (in a child): proves clang and the headers work."""
    return loader.compile_check()
