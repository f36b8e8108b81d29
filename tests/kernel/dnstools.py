"""A DNS server that answers late with an RCODE chosen by the name, and a client that counts.

Both run inside lab pods as scripts (`python -c`): the server answers every
query after a fixed delay, NOERROR for names starting "ok", NXDOMAIN for "nx",
SERVFAIL for "fail", and never for "drop". The client sends each name once,
waits for the answer, and prints what it got: the test's independent count.
"""

SERVER = r"""
import heapq, select, socket, struct, sys, time
delay = float(sys.argv[1])
RCODE = {b"ok": 0, b"nx": 3, b"fail": 2}
socks = []
for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, 53))
    socks.append(s)
print("up", flush=True)
due = []
while True:
    timeout = max(0.0, due[0][0] - time.monotonic()) if due else 1.0
    for s in select.select(socks, [], [], timeout)[0]:
        query, peer = s.recvfrom(2048)
        if len(query) < 13:
            continue
        label = query[13:13 + query[12]]
        kind = next((k for k in RCODE if label.startswith(k)), None)
        if kind is None:
            continue  # "drop": never answered
        flags = 0x8180 | RCODE[kind]  # QR, RD, RA and the RCODE
        answer = query[:2] + struct.pack(">HHHHH", flags, 1, 0, 0, 0) + query[12:]
        heapq.heappush(due, (time.monotonic() + delay, id(answer), s, answer, peer))
    while due and due[0][0] <= time.monotonic():
        _t, _i, s, answer, peer = heapq.heappop(due)
        s.sendto(answer, peer)
"""

CLIENT = r"""
import json, random, socket, struct, sys, time
server, names = sys.argv[1], sys.argv[2:]
family = socket.AF_INET6 if ":" in server else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(0.5)
got = {}
latencies = []
for name in names:
    qid = random.randrange(65536)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    s.sendto(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + b"\0\1\0\1", (server, 53))
    started = time.monotonic()
    try:
        while True:
            answer = s.recv(2048)
            if struct.unpack(">H", answer[:2])[0] == qid:
                break
    except socket.timeout:
        got["timeout"] = got.get("timeout", 0) + 1
        continue
    latencies.append(time.monotonic() - started)
    rcode = answer[3] & 0x0F
    got[rcode] = got.get(rcode, 0) + 1
print(json.dumps({"answers": got, "latencies": latencies}))
"""
