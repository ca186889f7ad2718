#!/usr/bin/env python3
"""cmp_report.py GOT EXPECTED STRIPE_BYTES: byte-compare; print OK or the differing stripes."""
import sys
got, exp, sb = sys.argv[1], sys.argv[2], int(sys.argv[3])
a, b = open(got, "rb").read(), open(exp, "rb").read()
if len(a) < len(b):
    print("SIZE got=%d expected=%d" % (len(a), len(b))); sys.exit(1)
bad = [i for i in range(0, len(b), sb) if a[i:i + sb] != b[i:i + sb]]
extra = a[len(b):].strip(b"\0")
if not bad and not extra:
    print("OK %d bytes identical" % len(b)); sys.exit(0)
for i in bad[:8]:
    j = next(k for k in range(i, min(i + sb, len(b))) if a[k] != b[k])
    print("stripe %d differs first at byte %d: got %s expected %s" % (i // sb, j, a[j:j+16].hex(), b[j:j+16].hex()))
print("DIFF %d stripes differ (of %d)%s" % (len(bad), (len(b) + sb - 1) // sb, ", nonzero bytes past expected end" if extra else ""))
sys.exit(1)
