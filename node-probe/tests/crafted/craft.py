#!/usr/bin/python3
"""Crafted packets for node-probe/tests/crafted.rs, run inside lab pods.

  craft.py send --src4 A --src6 A6 --run R --target INDEX,IPV4,IPV6 [...]
      From this network namespace's eth0, every case of CASES to each target, then a
      marker (a plain TCP SYN to port 9). Each packet carries its tag, so a capture can
      tell the cases apart: the IPv4 identification or the IPv6 flow label is
      tag(run, target, case). Run it pinned to one CPU: packets from one CPU are
      processed in the order sent, so the marker comes after every case.
  craft.py capture --from4 A --from6 A6 --stop FILE
      Prints "ready", then the tag of every IP packet from those addresses that reaches
      eth0 (neighbour discovery aside), until FILE exists; then drains and exits.
  craft.py cases
      The case names, one a line.
"""
import argparse
import os
import select
import socket
import struct
import sys

MARKER = 99
TTL = 77
TCP_PORT = 80
UDP_PORT = 5353


def tag(run, target, case):
    return run * 1000 + target * 100 + case


def sport(t):
    return 20000 + t


# --- the cases: (name, family, builder(ctx) -> list of L3 packets or ("L2", frame)) ---

def cases():
    from scapy.all import (IP, IPv6, TCP, UDP, SCTP, SCTPChunkInit, GRE, ICMP, ICMPv6DestUnreach,
                           IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting,
                           IPv6ExtHdrFragment, AH, ESP, Raw)

    def syn(c, flags="S", payload=b""):
        return TCP(sport=c.sport, dport=TCP_PORT, flags=flags, seq=1000) / Raw(payload)

    def chain(n):
        # Hop-by-hop first (only there is it valid), then routing, destination options,
        # an atomic fragment header, AH, and destination options for the rest. Each
        # header names the next one (scapy does not for AH).
        types = [0, 43, 60, 44, 51] + [60] * 16
        make = {0: lambda nh: IPv6ExtHdrHopByHop(nh=nh),
                43: lambda nh: IPv6ExtHdrRouting(nh=nh, type=253, segleft=0),
                60: lambda nh: IPv6ExtHdrDestOpt(nh=nh),
                44: lambda nh: IPv6ExtHdrFragment(nh=nh, offset=0, m=0, id=0x1234),
                51: lambda nh: AH(nh=nh, payloadlen=4, spi=1, seq=1, icv=b"\0" * 12)}
        hdrs = [make[types[i]](types[i + 1] if i + 1 < n else 6) for i in range(n)]
        out = hdrs[0]
        for h in hdrs[1:]:
            out = out / h
        return out

    def fragments(c, l4, size, overlap=False):
        """The L4 bytes in fragments of `size` bytes; with `overlap`, a second fragment
        rewrites the first one's last 8 bytes."""
        data = bytes(l4)
        if overlap:
            pieces = [(0, data[:24]), (16, data[16:])]
        else:
            pieces = [(i, data[i:i + size]) for i in range(0, len(data), size)]
        out = []
        for k, (off, chunk) in enumerate(pieces):
            more = k < len(pieces) - 1
            if c.fam == 4:
                out.append(c.ip(proto=6, flags="MF" if more else 0, frag=off // 8) / Raw(chunk))
            else:
                out.append(c.ip(nh=44) / IPv6ExtHdrFragment(nh=6, offset=off // 8, m=int(more), id=c.tag) / Raw(chunk))
        return out

    def tcp_bytes(c, flags="S", payload=b""):
        # Checksummed as a whole segment, then cut into fragments.
        pkt = c.ip() / syn(c, flags, payload)
        return pkt[TCP].__class__(bytes(pkt[TCP]))

    def truncated(c, l4, keep):
        raw = bytes(c.ip() / l4)
        if c.fam == 4:
            return [c.ip(len=20 + keep, proto=l4.__class__ == TCP and 6 or 17) / Raw(raw[20:])]
        return [c.ip(plen=keep, nh=l4.__class__ == TCP and 6 or 17) / Raw(raw[40:])]

    def icmp_error(c):
        # "Port unreachable" about a connection the target never had with us.
        if c.fam == 4:
            quoted = IP(src=c.dst, dst=c.src, id=1) / TCP(sport=TCP_PORT, dport=c.sport, flags="SA")
            return [c.ip() / ICMP(type=3, code=3) / Raw(bytes(quoted)[:28])]
        quoted = IPv6(src=c.dst, dst=c.src) / TCP(sport=TCP_PORT, dport=c.sport, flags="SA")
        return [c.ip() / ICMPv6DestUnreach(code=4) / Raw(bytes(quoted)[:48])]

    out = [
        ("syn", 4, lambda c: [c.ip() / syn(c)]),
        ("syn", 6, lambda c: [c.ip() / syn(c)]),
        ("udp", 4, lambda c: [c.ip() / UDP(sport=c.sport, dport=UDP_PORT) / Raw(b"flows")]),
        ("udp", 6, lambda c: [c.ip() / UDP(sport=c.sport, dport=UDP_PORT) / Raw(b"flows")]),
    ]
    for n in range(1, 17):
        out.append((f"ext-{n}", 6, lambda c, n=n: [c.ip() / chain(n) / syn(c)]))
    out += [
        ("frag-tiny", 4, lambda c: fragments(c, tcp_bytes(c), 8)),
        ("frag-tiny", 6, lambda c: fragments(c, tcp_bytes(c), 8)),
        ("frag-overlap", 4, lambda c: fragments(c, tcp_bytes(c, payload=b"x" * 16), 0, overlap=True)),
        ("frag-overlap", 6, lambda c: fragments(c, tcp_bytes(c, payload=b"x" * 16), 0, overlap=True)),
        ("trunc-tcp", 4, lambda c: truncated(c, syn(c), 10)),
        ("trunc-tcp", 6, lambda c: truncated(c, syn(c), 10)),
        ("trunc-udp", 4, lambda c: truncated(c, UDP(sport=c.sport, dport=UDP_PORT), 4)),
        ("trunc-udp", 6, lambda c: truncated(c, UDP(sport=c.sport, dport=UDP_PORT), 4)),
        ("vlan", 4, lambda c: [("L2", 2, c.ip() / syn(c))]),
        ("sctp-init", 4, lambda c: [c.ip() / SCTP(sport=c.sport, dport=TCP_PORT) / SCTPChunkInit(init_tag=1)]),
        ("sctp-init", 6, lambda c: [c.ip() / SCTP(sport=c.sport, dport=TCP_PORT) / SCTPChunkInit(init_tag=1)]),
        ("gre", 4, lambda c: [c.ip() / GRE() / IP(src=c.src, dst=c.dst) / syn(c)]),
        ("gre", 6, lambda c: [c.ip() / GRE() / IPv6(src=c.src, dst=c.dst) / syn(c)]),
        ("ipip", 4, lambda c: [c.ip(proto=4) / IP(src=c.src, dst=c.dst) / syn(c)]),
        ("esp", 4, lambda c: [c.ip() / ESP(spi=7, seq=1, data=b"x" * 16)]),
        ("esp", 6, lambda c: [c.ip() / ESP(spi=7, seq=1, data=b"x" * 16)]),
        ("icmp-error", 4, icmp_error),
        ("icmp-error", 6, icmp_error),
        ("syn-data", 4, lambda c: [c.ip() / syn(c, payload=b"GET / HTTP/1.0\r\n\r\n")]),
        ("syn-rst", 4, lambda c: [c.ip() / syn(c, flags="SR")]),
    ]
    return out


class Ctx:
    def __init__(self, fam, src, dst, t):
        self.fam, self.src, self.dst, self.tag, self.sport = fam, src, dst, t, sport(t)

    def ip(self, **kw):
        # TTL 77 tells crafted packets from the kernel's own (64, or 255 for neighbour
        # discovery), whatever their identification.
        from scapy.all import IP, IPv6
        if self.fam == 4:
            return IP(src=self.src, dst=self.dst, id=self.tag, ttl=TTL, **kw)
        return IPv6(src=self.src, dst=self.dst, fl=self.tag, hlim=TTL, **kw)


def next_hop_mac(fam, dst):
    from scapy.all import conf, getmacbyip, getmacbyip6
    if fam == 4:
        _, _, gw = conf.route.route(dst)
        hop = dst if gw == "0.0.0.0" else gw
        return getmacbyip(hop)
    _, _, gw = conf.route6.route(dst)
    hop = dst if gw == "::" else gw
    return getmacbyip6(hop)


def send(args):
    from scapy.all import Ether, Dot1Q, conf, sendp
    conf.verb = 0
    sock = conf.L2socket(iface="eth0")
    table = cases()
    for spec in args.target:
        index, ip4, ip6 = spec.split(",")
        index = int(index)
        macs = {4: next_hop_mac(4, ip4), 6: next_hop_mac(6, ip6)}
        for k, (name, fam, build) in enumerate(table):
            c = Ctx(fam, args.src4 if fam == 4 else args.src6, ip4 if fam == 4 else ip6, tag(args.run, index, k))
            for p in build(c):
                if isinstance(p, tuple):
                    # Two priority tags (VLAN 0): the kernel takes the outer one before
                    # TC, the inner one stays in the frame.
                    _, tags, l3 = p
                    frame = Ether(dst=macs[fam])
                    for _ in range(tags):
                        frame = frame / Dot1Q(vlan=0)
                    sock.send(frame / l3)
                else:
                    sock.send(Ether(dst=macs[fam]) / p)
        m = Ctx(4, args.src4, ip4, tag(args.run, index, MARKER))
        from scapy.all import TCP
        sock.send(Ether(dst=macs[4]) / m.ip() / TCP(sport=m.sport, dport=9, flags="S"))
    sock.close()


def capture(args):
    ETH_P_ALL = 0x0003
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind(("eth0", 0))
    s.setblocking(False)
    src4 = socket.inet_pton(socket.AF_INET, args.from4)
    src6 = socket.inet_pton(socket.AF_INET6, args.from6)
    print("ready", flush=True)

    def one(frame, addr):
        if addr[2] == socket.PACKET_OUTGOING:
            return
        off = 12
        proto = struct.unpack("!H", frame[off:off + 2])[0]
        while proto in (0x8100, 0x88A8):
            off += 4
            proto = struct.unpack("!H", frame[off:off + 2])[0]
        ip = frame[off + 2:]
        # Crafted packets only: their TTL, less the routers on the way.
        if proto == 0x0800 and len(ip) >= 20 and ip[12:16] == src4 and TTL - 5 <= ip[8] <= TTL:
            print(struct.unpack("!H", ip[4:6])[0], flush=True)
        elif proto == 0x86DD and len(ip) >= 40 and ip[8:24] == src6 and TTL - 5 <= ip[7] <= TTL:
            label = struct.unpack("!I", ip[0:4])[0] & 0xFFFFF
            print(label, flush=True)

    while True:
        stop = os.path.exists(args.stop)
        select.select([s], [], [], 0.05)
        while True:
            try:
                frame, addr = s.recvfrom(65535)
            except BlockingIOError:
                break
            one(frame, addr)
        if stop:
            return


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("send")
    p.add_argument("--src4", required=True)
    p.add_argument("--src6", required=True)
    p.add_argument("--run", type=int, required=True)
    p.add_argument("--target", action="append", required=True)
    p = sub.add_parser("capture")
    p.add_argument("--from4", required=True)
    p.add_argument("--from6", required=True)
    p.add_argument("--stop", required=True)
    sub.add_parser("cases")
    args = ap.parse_args()
    if args.cmd == "send":
        send(args)
    elif args.cmd == "capture":
        capture(args)
    else:
        for name, fam, _ in cases():
            print(f"{name}/v{fam}")


if __name__ == "__main__":
    main()
