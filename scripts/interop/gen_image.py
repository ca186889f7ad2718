#!/usr/bin/env python3
"""gen_image.py OUT SIZE SEED: SIZE bytes of seeded pseudo-random data, every 4 KiB block
starting with an ASCII stamp 'IMG<seed> BLK<n>' so a misplaced block is recognizable."""
import random, sys
out, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
with open(out, "wb") as f:
    done = 0
    while done < size:
        n = min(1 << 20, size - done)
        buf = bytearray(rng.randbytes(n))
        for off in range(0, n, 4096):
            stamp = b"IMG%d BLK%08d " % (seed, (done + off) // 4096)
            buf[off:off + len(stamp)] = stamp
        f.write(buf)
        done += n
