"""One benchmark script run from two checkouts in turn, in one run: a change's cost, measured.

    git worktree add --detach /tmp/base 7b098da
    python benchmarks/before_after.py --base /tmp/base --rounds 3 -- transport.py --seconds 3 --repeats 1
    python benchmarks/before_after.py --base /tmp/base --rounds 2 -- feeding.py --workers "" --steps 100

Each round runs ``python BASE/benchmarks/SCRIPT ARGS`` and then ``python THIS/benchmarks/SCRIPT
ARGS`` (each script puts its own checkout first on ``sys.path``, and the processes it starts run
in that checkout), so both see the same host, round after round. For ``transport.py`` it reports
each path's messages per second; for ``feeding.py`` each feed's steps per second and data-wait
percentage; the best round of each side, and this checkout's figure over the base's. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

THIS = Path(__file__).resolve().parent.parent


def run(tree: Path, script: str, args: list[str]) -> dict:
    done = subprocess.run([sys.executable, str(tree / "benchmarks" / script), *args], cwd=tree, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: {script} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def figures(script: str, report: dict) -> dict[str, dict[str, float]]:
    """name -> the figures compared, from one report."""
    if script == "transport.py":
        return {row["path"]: {"messages_per_s": row["messages_per_s"]} for row in report["results"]}
    return {row["feed"]: {"steps_per_s": row["steps_per_s"], "data_wait_pct": row["data_wait_pct"]} for row in report["results"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="the other checkout (e.g. a git worktree of the base commit)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("script", choices=("transport.py", "feeding.py"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments (after --)")
    options = parser.parse_args(argv)
    args = [a for a in options.args if a != "--"]
    rounds: dict[str, list[dict]] = {"base": [], "this": []}
    for _ in range(options.rounds):
        for side, tree in (("base", options.base.resolve()), ("this", THIS)):
            rounds[side].append(figures(options.script, run(tree, options.script, args)))
    best = {}
    for side, reports in rounds.items():
        best[side] = {}
        for name in reports[0]:
            key = next(iter(reports[0][name]))
            best_round = max(reports, key=lambda report, name=name, key=key: report[name][key])
            best[side][name] = best_round[name]
    ratios = {name: {key: round(best["this"][name][key] / best["base"][name][key], 3) if best["base"][name][key] else None
                     for key in best["this"][name]}
              for name in best["this"] if name in best["base"]}
    print(json.dumps({"script": options.script, "args": args, "base": str(options.base), "rounds": rounds,
                      "best": best, "this_over_base": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
