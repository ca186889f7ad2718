#!/usr/bin/env python3
"""An independent peer of ubiblk v0.5's remote stripe protocol (version 1), written from its
docs/remote-stripe.md, plaintext (Python's ssl has TLS-PSK only from 3.13).

  stripe_peer.py client HOST PORT OUT        HELLO, METADATA (every CRC checked), then every
                                             stripe with data; writes the disk to OUT and
                                             prints one JSON line (shift, stripes, statuses)
  stripe_peer.py raw HOST PORT HEX           sends the bytes HEX, prints what comes back (hex)
                                             until the server is silent for 1 s or closes
  stripe_peer.py server PORTFILE IMAGE SHIFT [MODE]
                                             serves IMAGE (stripes of 2^SHIFT sectors, all
                                             with data) on a free port written to PORTFILE;
                                             MODE makes it hostile: short (a stripe cut
                                             short, then close), wrongsize (a stripe size
                                             one sector off), garbage (status 0x7A), stall
                                             (answers HELLO and METADATA, never a stripe),
                                             busy (status 0xFF to every READ_STRIPE),
                                             idleclose (a connection idle for 0.3 s is
                                             closed, as the reference's server does after
                                             its operation timeout)
"""
import binascii, json, socket, struct, sys, threading, time, zlib

HELLO, METADATA, READ_STRIPE = 0x02, 0x00, 0x01
OK, INVALID_STRIPE, NO_DATA, NOT_FETCHED = 0x00, 0x01, 0x02, 0x03
FETCHED, WRITTEN, HAS_SOURCE = 1, 2, 4


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise EOFError("connection closed after %d of %d bytes" % (len(out), n))
        out += b
    return bytes(out)


def sector_ok(sec):
    return struct.unpack("<I", sec[508:512])[0] == zlib.crc32(sec[:508])


def parse_metadata(blob):
    assert len(blob) >= 512 and len(blob) % 512 == 0, len(blob)
    head = blob[:512]
    assert sector_ok(head), "header CRC"
    assert head[:9] == b"BDEV_UBI\0", head[:9]
    major, minor, shift, count = struct.unpack("<HHBI", head[9:18])
    assert (major, minor) == (2, 0), (major, minor)
    flags = bytearray()
    for n in range((count + 507) // 508):
        sec = blob[512 * (n + 1):512 * (n + 2)]
        assert sector_ok(sec), "sector %d CRC" % n
        flags += sec[:508]
    return shift, bytes(flags[:count])


def seal(sector_508):
    sec = bytes(sector_508).ljust(508, b"\0")
    return sec + struct.pack("<I", zlib.crc32(sec))


def make_metadata(shift, flags):
    head = b"BDEV_UBI\0" + struct.pack("<HHBI", 2, 0, shift, len(flags))
    out = seal(head)
    for i in range(0, len(flags), 508):
        out += seal(flags[i:i + 508])
    return out


def client(host, port, out_path):
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(bytes([HELLO]))
    st, version = struct.unpack("<BI", recv_exact(s, 5))
    assert (st, version) == (OK, 1), (st, version)
    s.sendall(bytes([METADATA]))
    st = recv_exact(s, 1)[0]
    assert st == OK, st
    size = struct.unpack("<Q", recv_exact(s, 8))[0]
    assert 512 <= size <= 64 << 20, size
    shift, flags = parse_metadata(recv_exact(s, size))
    stripe = 512 << shift
    statuses = {}
    with open(out_path, "wb") as f:
        for i, fl in enumerate(flags):
            if not fl & (FETCHED | WRITTEN | HAS_SOURCE):
                f.write(b"\0" * stripe)
                continue
            s.sendall(bytes([READ_STRIPE]) + struct.pack("<Q", i))
            st = recv_exact(s, 1)[0]
            statuses[st] = statuses.get(st, 0) + 1
            if st == OK:
                n = struct.unpack("<Q", recv_exact(s, 8))[0]
                assert n == stripe, (n, stripe)
                f.write(recv_exact(s, n))
            elif st == NO_DATA:
                f.write(b"\0" * stripe)
            else:
                raise SystemExit("stripe %d: status 0x%02x" % (i, st))
    # Past the end: invalid stripe.
    s.sendall(bytes([READ_STRIPE]) + struct.pack("<Q", len(flags)))
    beyond = recv_exact(s, 1)[0]
    print(json.dumps({"shift": shift, "stripes": len(flags), "statuses": statuses,
                      "beyond": beyond}))


def raw(host, port, hexdata):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(binascii.unhexlify(hexdata))
    s.settimeout(1.0)
    out = bytearray()
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except (socket.timeout, ConnectionResetError):
        pass
    print(out.hex())


def serve_conn(c, image, shift, mode):
    stripe = 512 << shift
    count = (len(image) + stripe - 1) // stripe
    if mode == "idleclose":
        # As the reference's server: a session idle longer than its timeout is closed.
        c.settimeout(0.3)
    try:
        while True:
            op = c.recv(1)
            if not op:
                return
            op = op[0]
            if op == HELLO:
                c.sendall(struct.pack("<BI", OK, 1))
            elif op == METADATA:
                blob = make_metadata(shift, bytes([HAS_SOURCE]) * count)
                c.sendall(bytes([OK]) + struct.pack("<Q", len(blob)) + blob)
            elif op == READ_STRIPE:
                i = struct.unpack("<Q", recv_exact(c, 8))[0]
                if i >= count:
                    c.sendall(bytes([INVALID_STRIPE]))
                    continue
                data = image[i * stripe:(i + 1) * stripe].ljust(stripe, b"\0")
                if mode == "short":
                    c.sendall(bytes([OK]) + struct.pack("<Q", stripe) + data[:stripe // 2])
                    return
                if mode == "wrongsize":
                    c.sendall(bytes([OK]) + struct.pack("<Q", stripe + 512) + data + b"\0" * 512)
                    continue
                if mode == "garbage":
                    c.sendall(bytes([0x7A]))
                    continue
                if mode == "busy":
                    c.sendall(bytes([0xFF]))
                    continue
                if mode == "stall":
                    time.sleep(3600)
                c.sendall(bytes([OK]) + struct.pack("<Q", stripe) + data)
            else:
                c.sendall(bytes([0xFE]))
    except (EOFError, OSError):
        pass
    finally:
        c.close()


def server(portfile, image_path, shift, mode="good"):
    image = open(image_path, "rb").read()
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 0))
    l.listen(64)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(l.getsockname()[1]))
    import os
    os.rename(portfile + ".tmp", portfile)
    while True:
        c, _ = l.accept()
        threading.Thread(target=serve_conn, args=(c, image, int(shift), mode), daemon=True).start()


if __name__ == "__main__":
    cmd = sys.argv[1]
    {"client": client, "raw": raw, "server": server}[cmd](*sys.argv[2:])
