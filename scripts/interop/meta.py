#!/usr/bin/env python3
"""meta.py show FILE | meta.py set FILE IDX=FLAGS...   (ubiblk metadata v2.0 on disk:
512-byte header, then 508 stripe bytes + CRC-32 per sector). Flags: 1 fetched, 2 written,
4 has source."""
import struct, sys, zlib
def crc_ok(s): return struct.unpack("<I", s[508:512])[0] == zlib.crc32(s[:508])
cmd, path = sys.argv[1], sys.argv[2]
b = bytearray(open(path, "rb").read())
assert b[:9] == b"BDEV_UBI\0" and crc_ok(b[:512]), "bad header"
major, minor, shift, count = struct.unpack("<HHBI", bytes(b[9:18]))
if cmd == "show":
    flags = bytearray()
    for n in range((count + 507) // 508):
        sec = b[512 * (n + 1):512 * (n + 2)]
        assert crc_ok(sec), "crc sector %d" % n
        flags += sec[:508]
    flags = flags[:count]
    runs, start = [], 0
    for i in range(1, count + 1):
        if i == count or flags[i] != flags[start]:
            runs.append("%d-%d:%d" % (start, i - 1, flags[start])); start = i
    print("version %d.%d shift %d stripes %d flags %s" % (major, minor, shift, count, " ".join(runs)))
elif cmd == "set":
    for a in sys.argv[3:]:
        i, f = map(int, a.split("="))
        n = i // 508
        b[512 * (n + 1) + i % 508] = f
        sec = b[512 * (n + 1):512 * (n + 1) + 508]
        b[512 * (n + 1) + 508:512 * (n + 2)] = struct.pack("<I", zlib.crc32(sec))
    open(path, "r+b").write(b)
