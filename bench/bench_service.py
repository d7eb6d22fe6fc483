"""Service benchmarks (issue 3): idle cost and burst handling of a real ``chatos-retrain run`` process.

    .venv/bin/python bench/bench_service.py [--idle-seconds 60] [--records 2000]

Prints: CPU seconds per idle minute (target <= 0.3 s), RSS (target <= 80 MB) and whether torch was imported
(must be False); then a burst of 1000 feedback lines written over 2 s: how many ingest batches it became (target
exactly 1) and the delay from the last write to the decision (target <= settle + 250 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon import control  # noqa: E402
from daemon.demo.storegen import generate_store  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mb(pid: int) -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


class Service:
    def __init__(self, work: Path, settle: float, max_wait: float) -> None:
        self.store = work / "ChatOS-Memory"
        self.cfg = work / "retrain.yaml"
        self.cfg.write_text(
            f"store:\n  root: {self.store}\nstate:\n  dir: {work / 'state'}\n"
            f"watch:\n  settle_s: {settle}\n  max_wait_s: {max_wait}\n"
            "policy:\n  min_new_examples: 100000\n  min_total_examples: 100000\n"
            "log:\n  format: json\n"
        )
        self.notify = work / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify))
        self.sock.settimeout(0.1)
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self.ready = threading.Event()
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify)}
        self.p = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(self.cfg), "run"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._notify, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            try:
                self.lines.append((time.monotonic(), json.loads(line)))
            except ValueError:
                pass

    def _notify(self) -> None:
        while self.p.poll() is None:
            try:
                if b"READY=1" in self.sock.recv(4096):
                    self.ready.set()
            except TimeoutError:
                continue

    def events(self, name: str, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in list(self.lines) if e.get("event") == name and t >= since]

    def wait_quiet(self) -> None:
        """Until the start-up cycle has finished."""
        end = time.monotonic() + 120
        while not self.events("cycle.summary") and time.monotonic() < end:
            time.sleep(0.05)

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(30)
        self.sock.close()


def idle(records: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_store(work / "ChatOS-Memory", records, days=10, seed=5)
        svc = Service(work, settle=5.0, max_wait=60.0)
        try:
            assert svc.ready.wait(120), "service never became ready"
            svc.wait_quiet()
            time.sleep(2)
            c0, t0 = cpu_seconds(svc.p.pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = cpu_seconds(svc.p.pid), time.monotonic()
            rss, hwm = rss_mb(svc.p.pid)
            live = control.request(work / "state" / "control.sock", {"cmd": "status"}, timeout=10)
        finally:
            svc.stop()
    return {"cpu_s_per_idle_min": (c1 - c0) / (t1 - t0) * 60, "rss_mb": rss, "peak_rss_mb": hwm,
            "torch_imported": live["service"].get("torch_imported"), "watcher": live["service"]["watcher"]}


def burst(n: int = 1000, over_s: float = 2.0, settle: float = 0.5) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_store(work / "ChatOS-Memory", 200, days=2, seed=6)
        svc = Service(work, settle=settle, max_wait=30.0)
        try:
            assert svc.ready.wait(120), "service never became ready"
            svc.wait_quiet()
            time.sleep(1.0)
            start = time.monotonic()
            path = work / "ChatOS-Memory" / "feedback" / "feedback_2026-11-25.jsonl"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                for i in range(n):
                    target = start + over_s * i / n
                    delay = target - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    ev = {"conversation_id": f"{i:012x}", "thumbs_up": True, "timestamp": "2026-11-25T10:00:00"}
                    os.write(fd, (json.dumps(ev) + "\n").encode())
            finally:
                os.close(fd)
            last_write = time.monotonic()
            end = last_write + settle + 10
            while not svc.events("cycle.decided", start) and time.monotonic() < end:
                time.sleep(0.005)
            time.sleep(settle + 1.0)  # anything else would show up now
            batches = svc.events("watch.batch", start)
            decided = svc.events("cycle.decided", start)
            summaries = svc.events("cycle.summary", start)
        finally:
            svc.stop()
    delay_ms = (decided[0][0] - last_write) * 1000 if decided else float("nan")
    ingested = summaries[0][1]["counts"]["ingest"]["feedback_events"] if summaries else None
    return {"lines": n, "written_over_s": over_s, "settle_s": settle, "batches": len(batches),
            "feedback_ingested": ingested, "decision_delay_ms": delay_ms,
            "target_ms": settle * 1000 + 250}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--records", type=int, default=2000)
    args = ap.parse_args()
    i = idle(args.records, args.idle_seconds)
    b = burst()
    ok = lambda cond: "PASS" if cond else "MISS"  # noqa: E731
    print(f"{'figure':<44} {'measured':>12} {'target':>10}  result")
    print(f"{'idle CPU s per minute':<44} {i['cpu_s_per_idle_min']:>12.3f} {'<= 0.3':>10}  "
          f"{ok(i['cpu_s_per_idle_min'] <= 0.3)}")
    print(f"{'idle RSS MB (peak)':<44} {i['rss_mb']:>6.1f} ({i['peak_rss_mb']:.1f}) {'<= 80':>10}  "
          f"{ok(i['rss_mb'] <= 80)}")
    print(f"{'torch imported by the service':<44} {i['torch_imported']!s:>12} {'False':>10}  "
          f"{ok(i['torch_imported'] is False)}")
    print(f"{'burst: ingest batches for 1000 lines / 2 s':<44} {b['batches']:>12} {'1':>10}  {ok(b['batches'] == 1)}")
    print(f"{'burst: feedback events ingested':<44} {b['feedback_ingested']!s:>12} {'1000':>10}  "
          f"{ok(b['feedback_ingested'] == 1000)}")
    print(f"{'burst: last write -> decision (ms)':<44} {b['decision_delay_ms']:>12.0f} {'<= ' + str(int(b['target_ms'])):>10}  "
          f"{ok(b['decision_delay_ms'] <= b['target_ms'])}")
    print(f"(watcher: {i['watcher']}; idle store {args.records} records; settle {b['settle_s']} s)")


if __name__ == "__main__":
    main()
