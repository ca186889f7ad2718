#!/usr/bin/env python3
"""Independent AES-256-XTS reference (OpenSSL through Python's `cryptography`) for the tests.

Usage: xts_ref.py encrypt|decrypt KEY1_HEX KEY2_HEX FIRST_SECTOR INFILE OUTFILE
Each 512-byte sector is one XTS data unit; its tweak is 8 zero bytes + LE64(sector)
(COMPAT.md). KEY1 is the data key, KEY2 the tweak key.
"""
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

op, k1, k2, first, src, dst = sys.argv[1:7]
key = bytes.fromhex(k1) + bytes.fromhex(k2)
data = open(src, "rb").read()
assert len(data) % 512 == 0, "whole sectors only"
out = bytearray()
for i in range(0, len(data), 512):
    tweak = bytes(8) + (int(first) + i // 512).to_bytes(8, "little")
    c = Cipher(algorithms.AES(key), modes.XTS(tweak))
    f = c.encryptor() if op == "encrypt" else c.decryptor()
    out += f.update(data[i:i + 512]) + f.finalize()
open(dst, "wb").write(out)
