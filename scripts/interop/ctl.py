#!/usr/bin/env python3
"""ctl.py SOCK LINE: send LINE (+newline) on a unix socket, print the first reply line."""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
buf = b""
while b"\n" not in buf:
    b = s.recv(65536)
    if not b:
        break
    buf += b
print(buf.split(b"\n")[0].decode())
