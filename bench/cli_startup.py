"""CLI start-up time: `flawline --help`, `flawline data --help` and `flawline data list`, each in a
fresh process, this checkout against an earlier revision measured side by side in the same run.

    python bench/cli_startup.py [--base 2320505] [--runs 15]

The earlier revision is checked out into a temporary git worktree and run with this venv's Python
(PYTHONPATH pointing at its ``platform/``); the runs alternate between the two, so load on the
machine falls on both alike. ``data list`` reads an empty SQLite catalog in a temporary folder
(what it costs is the imports and the schema check, not the rows). Also records which heavy modules
each command has loaded (``-X importtime``).

Writes docs/benchmarks/cli_startup.json and cli_startup.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "benchmarks"
COMMANDS = {"--help": ["--help"], "data --help": ["data", "--help"], "data list": ["data", "list"]}
HEAVY = ("sqlalchemy", "minio", "numpy", "PIL", "cv2", "torch", "ray", "label_studio_sdk")


def run_once(platform_dir: Path, args: list[str], env: dict[str, str]) -> float:
    env = dict(env, PYTHONPATH=str(platform_dir))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flawline.cli", *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"flawline {' '.join(args)} failed ({platform_dir}): {done.stderr.strip()[-400:]}")
    return elapsed


def loaded_heavy(platform_dir: Path, args: list[str], env: dict[str, str]) -> list[str]:
    env = dict(env, PYTHONPATH=str(platform_dir))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "flawline.cli", *args], env=env,
                          capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in names]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="2320505", help="the earlier revision to compare with")
    p.add_argument("--runs", type=int, default=15, help="runs per command and revision")
    args = p.parse_args()

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base_tree = tmp_path / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            env = dict(os.environ, FLAWLINE_DATA_DIR=str(tmp_path / "data"),
                       FLAWLINE_CATALOG_URL=f"sqlite:///{tmp_path / 'catalog.db'}")
            subprocess.run([sys.executable, "-m", "flawline.cli", "db", "upgrade"], env=dict(
                env, PYTHONPATH=str(REPO / "platform")), check=True, capture_output=True)
            trees = {"base": base_tree / "platform", "head": REPO / "platform"}
            times: dict[str, dict[str, list[float]]] = {c: {"base": [], "head": []} for c in COMMANDS}
            for name, argv in COMMANDS.items():
                for tree in trees.values():  # warm the file cache once per tree
                    run_once(tree, argv, env)
                for _ in range(args.runs):
                    for which, tree in trees.items():
                        times[name][which].append(run_once(tree, argv, env))
                print(f"{name}: base {statistics.median(times[name]['base']):.3f} s, "
                      f"head {statistics.median(times[name]['head']):.3f} s", flush=True)
            heavy = {name: {w: loaded_heavy(t, argv, env) for w, t in trees.items()} for name, argv in COMMANDS.items()}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, capture_output=True)

    rows = {name: {"base_median_s": round(statistics.median(t["base"]), 4),
                   "head_median_s": round(statistics.median(t["head"]), 4),
                   "ratio_head_to_base": round(statistics.median(t["head"]) / statistics.median(t["base"]), 3),
                   "base_runs_s": [round(x, 4) for x in t["base"]], "head_runs_s": [round(x, 4) for x in t["head"]],
                   "heavy_modules_loaded": heavy[name]}
            for name, t in times.items()}
    result = {"written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base": args.base, "head": head,
              "runs": args.runs, "cpus": os.cpu_count(), "python": platform.python_version(), "commands": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cli_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# CLI start-up time", "",
        f"Written {result['written']} on {result['cpus']} CPUs; `flawline COMMAND` in a fresh process, "
        f"{args.runs} runs each, revisions alternating (median wall time). base = {args.base}, head = {head}. "
        "`data list` reads an empty SQLite catalog. Script: `bench/cli_startup.py`.", "",
        "| command | base (s) | head (s) | head / base | heavy modules loaded (base → head) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        b, h = r["heavy_modules_loaded"]["base"], r["heavy_modules_loaded"]["head"]
        lines.append(f"| `flawline {name}` | {r['base_median_s']:.3f} | {r['head_median_s']:.3f} | "
                     f"{r['ratio_head_to_base']:.2f} | {', '.join(b) or '–'} → {', '.join(h) or '–'} |")
    (OUT / "cli_startup.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'cli_startup.json'} and {OUT / 'cli_startup.md'}")


if __name__ == "__main__":
    main()
