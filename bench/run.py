"""`make bench`: every benchmark, one after the other; RESULT lines are the figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["tc_cost.py", "throughput.py", "tracepoint_cost.py", "trace_cost.py", "scale.py",
           "node_api.py", "peer_index.py", "peers.py", "ring_cost.py", "cpu_share.py",
           "hot_cost.py", "tcx_attach.py", "tcx_move.py"]


def main() -> int:
    failed = 0
    for bench in BENCHES:
        print(f"== {bench}", flush=True)
        failed |= subprocess.run([sys.executable, str(HERE / bench), *sys.argv[1:]],
                                 check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
