"""Soak test: a trainer and N producers as real processes for a fixed time; memory and accounting.

    python benchmarks/soak.py [--minutes 3] [--producers 2] [--sample-every 5] [--json FILE]
                              [--producer-args "ARGS"] [--trainer-args "ARGS"]

Starts ``python -m trainer`` (a small CPU model) and ``--producers`` x ``python -m producer run``
on 127.0.0.1 and waits for the first training step. From then on, for ``--minutes``, it samples
every process's RSS (``/proc/PID/status`` VmRSS) and the trainer's ``GET /diagnostics`` every
``--sample-every`` seconds. Then it stops the producers with SIGTERM, lets the trainer drain
what is still on the way for up to ``--drain-timeout`` seconds, and stops the trainer.

It reports RSS over time per process, each process's RSS growth after warm-up (the first
``--warmup-fraction`` of the samples; growth = highest sample after warm-up minus the first one
after it) and the accounting: messages the producers sent (their ``summary`` lines) against
received + gaps in the trainer's ``/diagnostics``, with rejected and duplicated messages, and
``in_flight``: sent but not received when the trainer stopped (still in socket buffers, the
kernel's included: a few MB). Exit status 1 when a process grew more than ``--rss-limit-mib``
after warm-up, or a message is unaccounted for (gaps, duplicates, rejects, or more in flight
than ``--in-flight-limit-mib``). A short run (``--minutes 0.2``) is part of tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.endpoints import free_port  # noqa: E402

PRODUCER_ARGS = "--block-size 64 --rows-per-message 8"
TRAINER_ARGS = ("--batch-size 16 --n-layer 2 --n-head 2 --n-embd 64 --eval-interval 200 --eval-batches 2 "
                "--log-interval 100 --warmup-iters 20 --device cpu --probe-interval 0")
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def diagnostics(http_port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/diagnostics", timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def start(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child with stdout and stderr going to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)


def summary_line(log_path: Path) -> dict:
    """A producer's final ``summary {json}`` line."""
    lines = [line for line in log_path.read_text().splitlines() if line.startswith("summary ")]
    if not lines:
        raise RuntimeError(f"no summary line in {log_path}")
    return json.loads(lines[-1][len("summary "):])


def growth_after_warmup(series: list[int | None], warmup_samples: int) -> int:
    """Highest RSS after warm-up minus the first RSS after warm-up, in KiB."""
    after = [value for value in series[warmup_samples:] if value is not None]
    return max(after) - after[0] if after else 0


def soak(args: argparse.Namespace) -> dict:
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="linepack-soak-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    endpoint, http_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    trainer = start([sys.executable, "-m", "trainer", "--bind", endpoint, "--out-dir", str(out_dir / "run"),
                     "--http-port", str(http_port), "--max-iters", str(10**9), *shlex.split(args.trainer_args)],
                    out_dir / "trainer.log", env=dict(os.environ, OMP_NUM_THREADS=str(args.trainer_threads)))
    producers = {
        f"producer-{i}": start([sys.executable, "-m", "producer", "run", "--connect", endpoint, "--producer-id", f"producer-{i}",
                                *shlex.split(args.producer_args)], out_dir / f"producer-{i}.log")
        for i in range(args.producers)
    }
    processes = {"trainer": trainer, **producers}
    samples: list[dict] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        snapshot = None
        while snapshot is None or snapshot["step"] < 1:
            snapshot = diagnostics(http_port)
            if trainer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the trainer did not start training; see {out_dir / 'trainer.log'}")
            time.sleep(0.5)
        started = time.monotonic()
        while time.monotonic() - started < args.minutes * 60:
            if trainer.poll() is not None:
                raise RuntimeError(f"the trainer exited with {trainer.returncode}; see {out_dir / 'trainer.log'}")
            snapshot = diagnostics(http_port) or snapshot
            sample = {
                "t": round(time.monotonic() - started, 1),
                "rss_kib": {name: rss_kib(proc.pid) for name, proc in processes.items()},
                "step": snapshot["step"],
                "received": snapshot["stream"]["received"],
            }
            samples.append(sample)
            rss = "  ".join(f"{name} {(kib or 0) / 1024:7.1f}" for name, kib in sample["rss_kib"].items())
            print(f"t {sample['t']:7.1f} s  step {sample['step']}  received {sample['received']}  RSS MiB: {rss}", flush=True)
            time.sleep(args.sample_every)

        for proc in producers.values():
            proc.send_signal(signal.SIGTERM)
        sent = {}
        for name, proc in producers.items():
            proc.wait(STOP_TIMEOUT_S)
            sent[name] = summary_line(out_dir / f"{name}.log")["messages_handed_to_zeromq"]
        deadline = time.monotonic() + args.drain_timeout
        while True:  # the trainer keeps training, so it drains what is still on the way
            snapshot = diagnostics(http_port) or snapshot
            rows = snapshot["stream"]["producers"]
            drained = all(name in rows and rows[name]["messages"] + rows[name]["gaps"] >= n for name, n in sent.items())
            if drained or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(STOP_TIMEOUT_S)
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    stream = snapshot["stream"]
    warmup_samples = int(len(samples) * args.warmup_fraction)
    series = {name: [s["rss_kib"][name] for s in samples] for name in processes}
    growth = {name: growth_after_warmup(values, warmup_samples) for name, values in series.items()}
    accounting = {
        "sent": sum(sent.values()),
        "received": stream["received"],
        "accepted": stream["accepted"],
        "consumed_messages": stream["consumed_messages"],
        "gaps": stream["gaps"],
        "duplicates": stream["duplicates"],
        "rejected": stream["rejected_total"],
        "rejected_by_reason": stream["rejected"],
        "in_flight": sum(sent.values()) - stream["received"] - stream["gaps"],
        "per_producer": {name: {"sent": n, "received": stream["producers"].get(name, {}).get("messages", 0),
                                "gaps": stream["producers"].get(name, {}).get("gaps", 0)} for name, n in sent.items()},
    }
    limit_kib = int(args.rss_limit_mib * 1024)
    in_flight_bytes = accounting["in_flight"] * stream_message_bytes(out_dir, sent)
    return {
        "minutes": args.minutes,
        "out_dir": str(out_dir),
        "steps": snapshot["step"],
        "samples": len(samples),
        "warmup_samples": warmup_samples,
        "rss_kib": series,
        "sample_times_s": [s["t"] for s in samples],
        "rss_growth_after_warmup_kib": growth,
        "rss_limit_kib": limit_kib,
        "accounting": accounting,
        "in_flight_bytes": in_flight_bytes,
        "flat": all(value < limit_kib for value in growth.values()),
        "accounted": (accounting["gaps"] == accounting["duplicates"] == accounting["rejected"] == 0
                      and 0 <= in_flight_bytes < args.in_flight_limit_mib * 2**20),
    }


def stream_message_bytes(out_dir: Path, sent: dict[str, int]) -> int:
    """Mean tensor bytes per message sent (from the producers' summaries; headers not counted)."""
    payload = sum(summary_line(out_dir / f"{name}.log")["payload_bytes"] for name in sent)
    return payload // max(1, sum(sent.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long producers and trainer run (default: 3)")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--sample-every", type=float, default=5.0, metavar="S", help="seconds between samples (default: 5)")
    parser.add_argument("--warmup-fraction", type=float, default=0.25, help="leading share of samples that is warm-up (default: 0.25)")
    parser.add_argument("--rss-limit-mib", type=float, default=16.0, help="allowed RSS growth after warm-up per process (default: 16)")
    parser.add_argument("--drain-timeout", type=float, default=120.0, metavar="S",
                        help="seconds the trainer gets to receive what the stopped producers sent (default: 120)")
    parser.add_argument("--in-flight-limit-mib", type=float, default=32.0,
                        help="most tensor MiB that may still be on the way when the trainer stops (default: 32)")
    parser.add_argument("--trainer-threads", type=int, default=1,
                        help="torch intra-op threads of the trainer (OMP_NUM_THREADS); the producers share this "
                             "host's cores, and spinning torch threads on busy cores slow a CPU trainer many-fold (default: 1)")
    parser.add_argument("--producer-args", default=PRODUCER_ARGS, help=f"extra producer flags (default: {PRODUCER_ARGS!r})")
    parser.add_argument("--trainer-args", default=TRAINER_ARGS, help="extra trainer flags (default: a small CPU model)")
    parser.add_argument("--out-dir", help="logs and the run directory (default: a new temporary directory)")
    parser.add_argument("--json", metavar="FILE", help="also write the report here")
    args = parser.parse_args(argv)
    report = soak(args)
    print(f"growth after warm-up (KiB, limit {report['rss_limit_kib']}): {json.dumps(report['rss_growth_after_warmup_kib'])}")
    print(f"accounting: {json.dumps(report['accounting'])}")
    print(f"steps {report['steps']}, flat {report['flat']}, accounted {report['accounted']} "
          f"({report['accounting']['in_flight']} messages, {report['in_flight_bytes']} bytes in flight), logs in {report['out_dir']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["flat"] and report["accounted"] else 1


if __name__ == "__main__":
    sys.exit(main())
