"""Traffic of every kind the daemon counts, between three lab pods, for as long as needed.

So that every metric family has series and rates: ping (ICMP), TCP connections to a
listening server (handshakes, RTT, segments, flags), to a closed port (connection failures,
NO_SOCKET drops), UDP to a closed port (drops), and DNS queries whose answers are NOERROR,
NXDOMAIN, SERVFAIL or none (responses by RCODE, latency, timeouts).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from podnetlab.lab import LabPod
from tests.kernel.dnstools import SERVER as DNS_SERVER
from tests.kernel.support import spawn_in_pod

SERVE = ("import socket\ns=socket.create_server(('0.0.0.0',8080))\n"
         "while True:\n  c,_=s.accept(); c.sendall(b'x'*2000); c.close()")
CONNECT = ("import socket,sys,time\nwhile True:\n  for port in (8080, 81):\n    try:\n"
           "      c=socket.create_connection((sys.argv[1],port),timeout=2); c.recv(4096)"
           "; c.close()\n    except OSError: pass\n  time.sleep(0.1)")
UDP = ("import socket,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
       "while True:\n  s.sendto(b'x',(sys.argv[1],7777)); time.sleep(0.05)")
# one query a name in turn, every 100 ms: ok (NOERROR), nx (NXDOMAIN), fail (SERVFAIL),
# drop (never answered: a timeout)
DNS = ("import random,socket,struct,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
       "s.settimeout(0.3)\nwhile True:\n  for name in (b'ok',b'nx',b'fail',b'drop'):\n"
       "    q=struct.pack('>HHHHHH',random.randrange(65536),0x100,1,0,0,0)+bytes([len(name)])"
       "+name+b'\\x01x\\x00\\x00\\x01\\x00\\x01'\n    s.sendto(q,(sys.argv[1],53))\n"
       "    try: s.recv(512)\n    except OSError: pass\n    time.sleep(0.1)")


@contextmanager
def every_kind(client: LabPod, server: LabPod) -> Iterator[None]:
    """`client` talks to `server` in every way above until the block ends."""
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(spawn_in_pod(server, sys.executable, "-c", SERVE))
        procs.append(spawn_in_pod(server, sys.executable, "-c", DNS_SERVER, "0.002"))
        procs.append(spawn_in_pod(client, sys.executable, "-c", CONNECT, server.ip))
        procs.append(spawn_in_pod(client, sys.executable, "-c", UDP, server.ip))
        procs.append(spawn_in_pod(client, sys.executable, "-c", DNS, server.ip))
        procs.append(spawn_in_pod(client, "ping", "-i", "0.2", "-q", server.ip))
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()
