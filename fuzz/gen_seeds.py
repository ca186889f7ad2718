#!/usr/bin/env python3
"""Writes the seed inputs of fuzz_targets/parse_request.rs into seeds/parse_request/.

Each seed is a guest-memory image (see the layout comment at the top of the target) holding a
few well-formed virtio-blk chains, so the fuzzer starts from requests that parse.
"""
import os
import struct

DESC, AVAIL = 0x040, 0x140
NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


class Image:
    def __init__(self, next_avail=0, flags=0, size=16, limits=0):
        self.mem = bytearray(0x310)
        self.next_avail, self.flags, self.size, self.limits = next_avail, flags, size, limits
        self.ndesc = 0
        self.chains = 0

    def put(self, addr, data):
        self.mem[addr:addr + len(data)] = data

    def header(self, addr, req_type, sector=0):
        self.put(addr, struct.pack("<IIQ", req_type, 0, sector))

    def segment(self, addr, sector, sectors, flags=0):
        self.put(addr, struct.pack("<QII", sector, sectors, flags))

    def chain(self, descs):
        """descs: [(addr, len, flags)]; NEXT links are added here."""
        head = self.ndesc
        for i, (addr, length, flags) in enumerate(descs):
            idx = head + i
            nxt = idx + 1 if i + 1 < len(descs) else 0
            if i + 1 < len(descs):
                flags |= NEXT
            self.put(DESC + 16 * idx, struct.pack("<QIHH", addr, length, flags, nxt))
        self.ndesc += len(descs)
        slot = (self.next_avail + self.chains) % self.size
        self.put(AVAIL + 4 + 2 * slot, struct.pack("<H", head))
        self.chains += 1

    def table(self, addr, descs):
        """An indirect table at addr; returns its length in bytes."""
        for i, (a, length, flags) in enumerate(descs):
            if i + 1 < len(descs):
                flags |= NEXT
            self.put(addr + 16 * i, struct.pack("<QIHH", a, length, flags, i + 1 if i + 1 < len(descs) else 0))
        return 16 * len(descs)

    def bytes(self):
        size_sel = {16: 0, 8: 1, 4: 2, 2: 3, 1: 4}[self.size]
        self.put(0, struct.pack("<HBBB", self.next_avail, self.chains - 1, self.flags | size_sel << 4, self.limits))
        return bytes(self.mem)


def basic():
    m = Image()
    m.header(0x200, T_IN, 8)
    m.chain([(0x200, 16, 0), (0x1000, 4096, WRITE), (0x300, 1, WRITE)])
    m.header(0x210, T_OUT, 2040)
    m.chain([(0x210, 16, 0), (0x2000, 4096, 0), (0x301, 1, WRITE)])
    m.header(0x220, T_FLUSH)
    m.chain([(0x220, 16, 0), (0x302, 1, WRITE)])
    m.header(0x230, T_GET_ID)
    m.chain([(0x230, 16, 0), (0x3000, 20, WRITE), (0x303, 1, WRITE)])
    m.header(0x240, T_DISCARD)
    m.segment(0x280, 8, 16)
    m.segment(0x290, 100, 1)
    m.chain([(0x240, 16, 0), (0x280, 32, 0), (0x304, 1, WRITE)])
    return m.bytes()


def framing():
    m = Image(flags=1)
    m.header(0x250, T_WRITE_ZEROES)
    m.segment(0x2B0, 0, 256, 1)
    m.chain([(0x250, 16, 0), (0x2B0, 16, 0), (0x305, 1, WRITE)])
    m.header(0x260, T_IN, 4)
    n = m.table(0x2C0, [(0x260, 16, 0), (0x4000, 512, WRITE), (0x306, 1, WRITE)])
    m.chain([(0x2C0, n, INDIRECT)])
    # Header split in two; data and status in one descriptor.
    m.header(0x270, T_IN, 0)
    m.chain([(0x270, 8, 0), (0x278, 8, 0), (0x5000, 1025, WRITE)])
    # Header and write data in one descriptor; data straddling regions A and B.
    m.header(0x2F0, T_OUT, 1)
    m.chain([(0x2F0, 16 + 512, 0), (0xFE00, 1024, 0), (0x307, 1, WRITE)])
    return m.bytes()


def big():
    m = Image(next_avail=0xFFFE, flags=1)
    # max_data_len (64 KiB) exactly, ending at the last sector, across regions A and B.
    m.header(0x200, T_IN, 2048 - 128)
    m.chain([(0x200, 16, 0), (0x8000, 0x8000, WRITE), (0x10000, 0x8000, WRITE), (0x300, 1, WRITE)])
    m.header(0x210, T_OUT, 0)
    m.chain([(0x210, 16, 0), (0x30000, 0x1000, 0), (0x301, 1, WRITE)])
    m.header(0x220, T_GET_ID)
    m.chain([(0x220, 16, 0), (0x30000, 0x40, WRITE)])
    return m.bytes()


def small_disk():
    # limits variant 1: an 8-sector disk, requests ending exactly at its end.
    m = Image(limits=1)
    m.header(0x200, T_IN, 7)
    m.chain([(0x200, 16, 0), (0x1000, 512, WRITE), (0x300, 1, WRITE)])
    m.header(0x210, T_DISCARD)
    m.segment(0x280, 4, 4)
    m.chain([(0x210, 16, 0), (0x280, 16, 0), (0x301, 1, WRITE)])
    m.header(0x220, T_OUT, 0)
    m.chain([(0x220, 16, 0), (0x1000, 4096, 0), (0x302, 1, WRITE)])
    return m.bytes()


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "parse_request")
    os.makedirs(out, exist_ok=True)
    for name, gen in [("basic", basic), ("framing", framing), ("big", big), ("small_disk", small_disk)]:
        with open(os.path.join(out, name), "wb") as f:
            f.write(gen())


if __name__ == "__main__":
    main()
