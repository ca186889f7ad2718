#!/usr/bin/env python3
"""Boots the test guest (build-guest.sh) under QEMU on one vhost-user-blk socket, then
live-migrates it between QEMU processes on this host, each connected to its own socket:
QEMU 0 on --sockets[0] migrates to a new QEMU 1 on --sockets[1], which migrates to a new
QEMU 2 on --sockets[2], ... (`-incoming tcp:127.0.0.1:PORT`, QMP `migrate`). Each hop waits
until the guest console has printed --wait-for (a regex) once more since the last hop.

Prints one JSON line on stdout: {"exit_status": N|null, "hops": [{"downtime_ms", "total_ms",
"dirty_sync_count", "status"}...], "error": str|null}; the guest console (all QEMUs, in order)
goes to --console. Exit status 0 when every hop completed and the guest reported status 0.

Needs python3 and qemu-system-x86_64 only (QMP spoken by hand).
"""
import argparse
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time


class Qmp:
    def __init__(self, path, deadline):
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"QMP socket {path} never came up")
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")
            # events: ignored


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--guest", required=True)
    ap.add_argument("--script", required=True)
    ap.add_argument("--sockets", required=True, help="comma-separated, one per QEMU")
    ap.add_argument("--queues", default="1")
    ap.add_argument("--mem", default="512M")
    ap.add_argument("--cmdline", default="")
    ap.add_argument("--bandwidth", type=int, default=0, help="max-bandwidth, bytes/s (0: QEMU's)")
    ap.add_argument("--wait-for", default=r"round \d+ verified")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--cancel-first", action="store_true",
                    help="start the first hop at 1 MiB/s, cancel it, then migrate for real")
    ap.add_argument("--console", required=True)
    a = ap.parse_args()

    deadline = time.time() + a.timeout
    work = tempfile.mkdtemp(prefix="ubiblk-migrate.")
    procs = []
    result = {"exit_status": None, "hops": [], "error": None, "cancelled": False}
    try:
        # The guest's initramfs with the script as /run.sh (as run-guest.sh builds it).
        os.makedirs(f"{work}/r")
        shutil.copy(a.script, f"{work}/r/run.sh")
        os.chmod(f"{work}/r/run.sh", 0o755)
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
                              input=b"run.sh\n", cwd=f"{work}/r", capture_output=True, check=True)
        with open(f"{work}/initrd", "wb") as out:
            with open(f"{a.guest}/initramfs.img", "rb") as base:
                shutil.copyfileobj(base, out)
            out.write(gzip.compress(cpio.stdout, 1))

        qemu = os.environ.get("QEMU", "qemu-system-x86_64")

        def start(i, sock, incoming):
            cmd = [qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", a.mem,
                   "-object", f"memory-backend-memfd,id=mem,size={a.mem},share=on",
                   "-machine", "q35,memory-backend=mem",
                   "-kernel", f"{a.guest}/vmlinuz", "-initrd", f"{work}/initrd",
                   "-append", f"console=ttyS0 quiet panic=-1 mitigations=off {a.cmdline}",
                   "-chardev", f"socket,id=c0,path={sock}",
                   "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={a.queues}",
                   "-display", "none", "-no-reboot", "-nodefaults",
                   "-serial", f"file:{work}/console{i}",
                   "-qmp", f"unix:{work}/qmp{i},server=on,wait=off"]
            if incoming:
                cmd += ["-incoming", incoming]
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
            procs.append(p)
            return p, Qmp(f"{work}/qmp{i}", deadline)

        def console(i):
            try:
                with open(f"{work}/console{i}", "rb") as f:
                    return f.read().decode(errors="replace").replace("\r", "")
            except FileNotFoundError:
                return ""

        marker = re.compile(a.wait_for)

        def progress(n, seen, proc, when):
            """Waits until the consoles of QEMUs 0..n show one more marker than `seen`."""
            while True:
                text = "".join(console(j) for j in range(n))
                found = len(marker.findall(text))
                if found > seen:
                    return found
                if "GUEST-EXIT-STATUS" in text or proc.poll() is not None:
                    raise RuntimeError(f"the guest ended {when}")
                if time.time() > deadline:
                    raise RuntimeError(f"timeout waiting for {a.wait_for!r} {when}")
                time.sleep(0.1)

        socks = a.sockets.split(",")
        proc, qmp = start(0, socks[0], None)
        seen = 0
        for i in range(1, len(socks)):
            # Wait for the workload to make progress on the current QEMU.
            seen = progress(i, seen, proc, f"before hop {i}")
            if a.cancel_first and i == 1:
                # A migration cancelled during pre-copy: the source keeps serving its guest.
                port = free_port()
                cproc, _cqmp = start(len(socks), socks[i], f"tcp:127.0.0.1:{port}")
                qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
                qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
                time.sleep(1)
                qmp.cmd("migrate_cancel")
                while qmp.cmd("query-migrate").get("status") not in ("cancelled", "failed"):
                    if time.time() > deadline:
                        raise RuntimeError("the cancelled migration never ended")
                    time.sleep(0.05)
                st = qmp.cmd("query-status").get("status")
                if st != "running":
                    raise RuntimeError(f"after the cancel the source VM is {st}")
                result["cancelled"] = True
                cproc.kill()
                cproc.wait()
                qmp.cmd("migrate-set-parameters", **{"max-bandwidth": a.bandwidth or (128 << 20)})
                # The guest must still make progress on the source.
                seen = progress(i, seen, proc, "after the cancelled migration")
            port = free_port()
            nproc, nqmp = start(i, socks[i], f"tcp:127.0.0.1:{port}")
            if a.bandwidth:
                qmp.cmd("migrate-set-parameters", **{"max-bandwidth": a.bandwidth})
            qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            while True:
                info = qmp.cmd("query-migrate")
                st = info.get("status")
                if st in ("completed", "failed", "cancelled"):
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"hop {i}: migration still {st} at the timeout")
                time.sleep(0.05)
            hop = {"status": st, "downtime_ms": info.get("downtime"),
                   "total_ms": info.get("total-time"),
                   "dirty_sync_count": info.get("ram", {}).get("dirty-sync-count")}
            if st != "completed":
                hop["error"] = info.get("error-desc")
                result["hops"].append(hop)
                raise RuntimeError(f"hop {i}: migration {st}: {info.get('error-desc')}")
            result["hops"].append(hop)
            try:
                qmp.cmd("quit")
            except (RuntimeError, OSError, ValueError):
                pass
            proc.wait(timeout=30)
            proc, qmp = nproc, nqmp
        # The last QEMU runs the guest to its end (it powers off).
        while proc.poll() is None:
            if time.time() > deadline:
                raise RuntimeError("timeout waiting for the guest to finish")
            time.sleep(0.2)
        m = re.findall(r"GUEST-EXIT-STATUS=(\d+)", console(len(socks) - 1))
        result["exit_status"] = int(m[-1]) if m else None
    except Exception as e:  # reported in the JSON line
        result["error"] = str(e)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        with open(a.console, "w") as out:
            for i in range(len(procs)):
                out.write(f"===== QEMU {i} =====\n")
                out.write(console(i))
                qout = procs[i].stdout.read().decode(errors="replace") if procs[i].stdout else ""
                if qout:
                    out.write(f"----- QEMU {i} stderr -----\n{qout}")
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    ok = result["error"] is None and result["exit_status"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
