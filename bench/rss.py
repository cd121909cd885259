"""Run a command and measure its wall time and peak memory (whole process tree).

    python3 bench/rss.py [--interval 0.1] [--echo] [--timeout S] -- CMD [ARGS...]

prints one JSON object; as a module::

    from rss import measure
    r = measure([sys.executable, "script.py"], env=None, cwd=None)
    r["seconds"], r["peak_rss_mb"], r["maxrss_mb"], r["returncode"]

Two memory figures, both in MiB (2**20 bytes):

* ``peak_rss_mb``: the largest sum of resident set sizes of the child and all its
  descendants, sampled from /proc every ``interval`` seconds (so a spike shorter than the
  interval can be missed, and shared pages are counted once per process).
* ``maxrss_mb``: ``ru_maxrss`` of the child as returned by ``wait4`` for that child alone,
  i.e. what ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` reports after the wait, but
  not mixed with earlier children of this process. It is the kernel's exact high-water
  mark of the single largest process (the child or a descendant it waited for), not a sum.

Also returned: ``peak_child_rss_mb`` (sampled, child process only), ``max_procs`` (most
processes seen at once in the tree), ``timed_out``, and the last ``tail`` characters of
stdout and stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def _ppid_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # process vanished
            continue
        # field 2 (comm) may contain spaces and parentheses: split after the last ')'
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children = _ppid_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _drain(stream, keep: int, sink, buf: list[bytes]) -> None:
    """Read ``stream`` to EOF, keeping its last ``keep`` bytes in buf[0]; echo to ``sink``."""
    tail = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        if sink is not None:
            sink.write(chunk)
            sink.flush()
        tail = (tail + chunk)[-keep:]
    buf.append(tail)


def measure(cmd: list[str], env: dict | None = None, cwd: str | None = None, *,
            interval: float = 0.1, tail: int = 4000, echo: bool = False,
            timeout: float | None = None) -> dict:
    """Run ``cmd`` (a list of args) to completion; see the module docstring for the result.

    ``env`` replaces the environment when given (pass ``{**os.environ, ...}`` to extend it).
    ``echo`` copies the child's stdout/stderr to ours as they arrive. On ``timeout`` the
    child's process group is killed (SIGKILL) and ``timed_out`` is True.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    outs: list[bytes] = []
    errs: list[bytes] = []
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, tail * 4, sys.stdout.buffer if echo else None, outs), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, tail * 4, sys.stderr.buffer if echo else None, errs), daemon=True),
    ]
    for r in readers:
        r.start()
    peak = peak_child = max_procs = 0
    timed_out = False
    status = ru = None
    while True:
        pid, st, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            status, ru = st, usage
            break
        pids = tree_pids(proc.pid)
        sizes = [_rss_bytes(p) for p in pids]
        peak = max(peak, sum(sizes))
        peak_child = max(peak_child, sizes[0])
        max_procs = max(max_procs, len(pids))
        if timeout is not None and time.perf_counter() - t0 > timeout and not timed_out:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(interval)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()

    def text(parts: list[bytes]) -> str:
        return (parts[0] if parts else b"").decode("utf-8", "replace")[-tail:]

    return {
        "cmd": list(cmd),
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(peak / MIB, 1),
        "maxrss_mb": round(ru.ru_maxrss * 1024 / MIB, 1),  # ru_maxrss is in KiB on Linux
        "peak_child_rss_mb": round(peak_child / MIB, 1),
        "max_procs": max_procs,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "stdout_tail": text(outs),
        "stderr_tail": text(errs),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    i = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between /proc samples")
    ap.add_argument("--tail", type=int, default=4000, help="characters of stdout/stderr to keep")
    ap.add_argument("--echo", action="store_true", help="copy the child's output to ours as it runs")
    ap.add_argument("--timeout", type=float, default=None, help="kill the command after S seconds")
    args = ap.parse_args(argv[:i])
    cmd = argv[i + 1:]
    if not cmd:
        ap.error("no command after --")
    result = measure(cmd, interval=args.interval, tail=args.tail, echo=args.echo, timeout=args.timeout)
    print(json.dumps(result, indent=2))
    return result["returncode"] if result["returncode"] >= 0 else 128 - result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
