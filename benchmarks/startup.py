"""Start-up: a whole process that imports the engine and counts ten rows, against DuckDB and
Polars in the same run.

    python benchmarks/startup.py                 # best of 5 per engine
    python benchmarks/startup.py --repeat 10 --engines millstream,duckdb
    python benchmarks/startup.py --baseline-src ../main/src   # also another checkout's

Each engine runs once to warm up, then ``N`` times as a fresh ``python -c ...`` process
(interleaved, so load on a shared machine falls on all alike), with byte code cached as an
installed package has it (``PYTHONDONTWRITEBYTECODE`` is ignored; the caches go to
``benchmarks/results/pycache``, not into the source trees); the table gives the best wall time and the best CPU time
(user + system of the process tree) of each, and their ratios to Millstream's. A
``python`` row (an empty program) shows the interpreter's own share. The answer (10) is
checked.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO_DIR,
    environment_info,
    format_table,
    module_available,
    run_measured,
    write_results,
)

#: engine -> (the module it needs, the program)
PROGRAMS = {
    "millstream": ("millstream", "import millstream as ms; print(ms.range(10).count())"),
    "duckdb": ("duckdb", "import duckdb; "
               "print(duckdb.sql('SELECT count(*) FROM range(10)').fetchall()[0][0])"),
    "polars": ("polars", "import polars as pl; "
               "print(pl.select(pl.int_range(10).alias('id')).select(pl.len()).item())"),
    "python": (None, "print(10)"),
}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="runs per engine (best is kept)")
    p.add_argument("--engines", default=",".join(PROGRAMS),
                   help=f"comma-separated, from {', '.join(PROGRAMS)}")
    p.add_argument("--baseline-src", default=None, metavar="DIR",
                   help="also time the millstream package of another checkout's src/ "
                        "(the row 'millstream@baseline'), e.g. before a change")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in PROGRAMS]
    if unknown:
        p.error(f"unknown engines: {unknown}")
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(REPO_DIR / "benchmarks" / "results" / "pycache")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR / "src")]
                                        + [x for x in [env.get("PYTHONPATH")] if x])
    envs = {e: env for e in engines}
    programs = {e: PROGRAMS[e][1] for e in engines}
    available = [e for e in engines
                 if PROGRAMS[e][0] in (None, "millstream") or module_available(PROGRAMS[e][0])]
    if args.baseline_src:
        base_src = str(Path(args.baseline_src).resolve())
        envs["millstream@baseline"] = {**env, "PYTHONPATH": base_src}
        programs["millstream@baseline"] = PROGRAMS["millstream"][1]
        available.insert(1, "millstream@baseline")
    log_dir = REPO_DIR / "benchmarks" / "results" / "logs" / "startup"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[tuple[float, float]]] = {e: [] for e in available}
    for i in range(-1, args.repeat):  # run -1 warms up (byte code, page cache)
        for engine in available:
            log = log_dir / f"{engine}-{i}.log"
            run = run_measured([sys.executable, "-c", programs[engine]], env=envs[engine],
                               timeout_s=120, log_path=log, with_pss=False, interval_s=0.02)
            out = log.read_text(errors="replace").strip().splitlines()
            if run.returncode != 0 or not out or out[-1].strip() != "10":
                print(f"{engine}: failed or wrong answer (see {log}):\n{run.stderr_tail}",
                      file=sys.stderr)
                return 2
            if i >= 0:
                runs[engine].append((run.wall_s, run.cpu_s or 0.0))
    best = {e: (min(w for w, _ in r), min(c for _, c in r)) for e, r in runs.items()}
    base = best.get("millstream")
    rows = []
    for engine in available:
        wall, cpu = best[engine]
        ratio = (f"{base[0] / wall:.2f}x / {base[1] / cpu:.2f}x" if base and wall and cpu
                 else "-")
        rows.append([engine, f"{wall:.3f}", f"{cpu:.3f}", ratio])
    print(f"best of {args.repeat} whole processes (python -c ...), seconds")
    print(format_table(["engine", "wall s", "CPU s", "millstream / engine (wall / CPU)"],
                       rows))
    missing = [e for e in engines if e not in available]
    if missing:
        print(f"not installed: {', '.join(missing)} (pip install -e '.[bench]')")
    path = write_results("startup", {
        "repeat": args.repeat, "programs": {e: programs[e] for e in available},
        "baseline_src": args.baseline_src,
        "best": {e: {"wall_s": w, "cpu_s": c} for e, (w, c) in best.items()},
        "runs": runs, "environment": environment_info(["pyarrow", "duckdb", "polars"]),
    })
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
