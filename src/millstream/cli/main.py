"""The ``millstream`` command line.

    millstream mapreduce path/to/job.py:WordCount INPUT... -o OUTPUT [--reducers N]
              [--runner local|ray] [--address HOST:PORT] [--format text|parquet] [--mode error|overwrite]
              [--parallelism N] [--memory-limit 2GB] [--max-task-attempts 4]
    millstream sql "SELECT ... FROM 'data/*.parquet'" | -f query.sql [-o out.parquet]
              [--table NAME=PATH ...] [--explain] [--dialect duckdb] [--max-rows 50]
              [--runner local|ray] [--address HOST:PORT] [--mode error|overwrite|append]

    millstream ui --history DIR [--host 127.0.0.1] [--port 18080]

Progress and the job's counters go to stderr; the output is committed atomically. ``ui``
serves the dashboard's pages for the jobs whose event logs are in DIR (a path or storage
URI that ``ms.init(event_log_dir=...)`` wrote), until interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem with the command line's arguments (exit code 2)."""


def _load_module(ref: str) -> ModuleType:
    """Import a job module from a file path (shipped to workers by value) or a module name."""
    import cloudpickle

    if ref.endswith(".py") or os.sep in ref or os.path.exists(ref):
        path = os.path.abspath(ref)
        if not os.path.isfile(path):
            raise CliError(f"job file {ref} does not exist")
        stem = os.path.splitext(os.path.basename(path))[0]
        name = f"_millstream_job_{stem}_{abs(hash(path)) & 0xFFFFFF:06x}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CliError(f"cannot load {ref} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # so the job file may import its neighbours
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise CliError(f"importing {ref} failed: {type(exc).__name__}: {exc}") from exc
        # the workers cannot import this file by name: ship its classes by value
        cloudpickle.register_pickle_by_value(module)
        return module
    try:
        return importlib.import_module(ref)
    except ImportError as exc:
        raise CliError(f"cannot import job module {ref!r}: {exc}") from exc


def load_job_class(spec: str) -> type:
    """The MapReduceJob subclass named by ``path/to/job.py:Class`` (or ``module:Class``)."""
    from millstream.api.mapreduce import MapReduceJob

    ref, _, cls_name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not ref:
        raise CliError(f"job {spec!r}: expected path/to/job.py:ClassName")
    module = _load_module(ref)
    if cls_name:
        cls = getattr(module, cls_name, None)
        if cls is None:
            raise CliError(f"{ref} has no class {cls_name!r}")
        if not (inspect.isclass(cls) and issubclass(cls, MapReduceJob)):
            raise CliError(f"{ref}:{cls_name} is not a subclass of millstream.MapReduceJob")
        return cls
    found = [c for c in vars(module).values()
             if inspect.isclass(c) and issubclass(c, MapReduceJob) and c is not MapReduceJob
             and c.__module__ == module.__name__]
    if len(found) != 1:
        names = ", ".join(c.__name__ for c in found) or "none"
        raise CliError(f"{ref} defines {len(found)} MapReduceJob classes ({names}); name one as "
                       f"{ref}:ClassName")
    return found[0]


def format_counters(counters: dict[tuple[str, str], int]) -> str:
    """Counters grouped as Hadoop prints them."""
    lines = [f"Counters: {len(counters)}"]
    groups: dict[str, list[tuple[str, int]]] = {}
    for (group, name), n in counters.items():
        groups.setdefault(group, []).append((name, n))
    for group in sorted(groups):
        lines.append(f"\t{group}")
        for name, n in sorted(groups[group]):
            lines.append(f"\t\t{name}={n}")
    return "\n".join(lines)


def _format_stages(stats: Any) -> str:
    lines = []
    for s in stats.stages:
        lines.append(f"  stage {s['stage']} ({s['purpose']}): {s['tasks']} task(s), "
                     f"{s['rows_in']} records in, {s['rows_out']} out, {s['seconds']:.2f}s")
    return "\n".join(lines)


def cmd_mapreduce(args: argparse.Namespace) -> int:
    """Run a MapReduceJob over text input and write its output."""
    import millstream as ms
    from millstream.errors import MillstreamError, OutputExistsError

    cls = load_job_class(args.job)
    options: dict[str, Any] = {"runner": args.runner}
    if args.address is not None:
        if args.runner != "ray":
            print("millstream: --address needs --runner ray", file=sys.stderr)
            return 2
        options["address"] = args.address
    if args.parallelism is not None:
        options["parallelism"] = args.parallelism
    if args.memory_limit is not None:
        options["memory_limit"] = args.memory_limit
    if args.max_task_attempts is not None:
        options["max_task_attempts"] = args.max_task_attempts
    options["progress"] = args.progress
    try:
        ms.init(**options)
    except (MillstreamError, TypeError, ValueError) as exc:
        print(f"millstream: {exc}", file=sys.stderr)
        return EXIT_FAILED
    job = cls()
    err = sys.stderr
    try:
        nsteps = len(job.steps())
        print(f"Running {cls.__name__} ({nsteps} step(s)) on {', '.join(args.input)} "
              f"-> {args.output} ({args.format})", file=err, flush=True)
        t0 = time.perf_counter()
        job.run(args.input if len(args.input) > 1 else args.input[0], args.output,
                format=args.format, mode=args.mode, num_reducers=args.reducers,
                split_size=args.split_size)
    except OutputExistsError as exc:
        print(f"Job failed: {cli_spelling(str(exc))}", file=err)
        return EXIT_FAILED
    except MillstreamError as exc:
        print(f"Job failed: {exc}", file=err)
        if job.counters:
            print(format_counters(job.counters), file=err)
        return EXIT_FAILED
    finally:
        ms.shutdown()
    if job.stats is not None:
        print(_format_stages(job.stats), file=err)
    print(f"Job succeeded in {time.perf_counter() - t0:.2f}s; output in {args.output}", file=err)
    print(format_counters(job.counters), file=err, flush=True)
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the dashboard over the event logs in ``--history`` until interrupted."""
    import signal
    import threading

    try:
        from millstream.ui.history import serve_history
    except ImportError as exc:  # pragma: no cover - the package itself is broken
        print(f"millstream ui: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        server, loader = serve_history(args.history, args.host, args.port)
    except ImportError:
        print("millstream ui: the dashboard needs its server library: "
              "pip install 'millstream[ui]'", file=sys.stderr)
        return EXIT_FAILED
    except (FileNotFoundError, OSError) as exc:
        print(f"millstream ui: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"millstream: history server for {args.history} at {server.url}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        loader.stop()
        server.stop()
    return EXIT_OK


def _session_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``ms.init`` options from the runner arguments (None after printing a usage error)."""
    options: dict[str, Any] = {"runner": args.runner}
    if args.address is not None:
        if args.runner != "ray":
            print("millstream: --address needs --runner ray", file=sys.stderr)
            return None
        options["address"] = args.address
    if args.parallelism is not None:
        options["parallelism"] = args.parallelism
    if args.memory_limit is not None:
        options["memory_limit"] = args.memory_limit
    options["progress"] = args.progress
    return options


def cmd_sql(args: argparse.Namespace) -> int:
    """Run SQL: print the result as a table, write it (-o), or print the plans."""
    import millstream as ms
    from millstream.errors import MillstreamError, OutputExistsError

    if (args.query is None) == (args.file is None):
        raise CliError("give the query as an argument or with -f FILE (one of them)")
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                query = f.read()
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc}") from exc
    else:
        query = args.query
    tables = {}
    for spec in args.table or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--table {spec!r}: expected NAME=PATH")
        tables[name] = path
    options = _session_options(args)
    if options is None:
        return EXIT_USAGE
    err = sys.stderr
    try:
        ms.init(**options)
    except (MillstreamError, TypeError, ValueError) as exc:
        print(f"millstream: {exc}", file=err)
        return EXIT_FAILED
    try:
        for name, path in tables.items():
            ms.register(name, path)
        ds = ms.sql(query, dialect=args.dialect)
        if ds is None:
            print("OK", file=err)
            return EXIT_OK
        if args.explain:
            print(ds.explain(print_plan=False))
            return EXIT_OK
        if args.output is not None:
            fmt = args.format or _format_of(args.output)
            writer = {"parquet": ds.write_parquet, "csv": ds.write_csv,
                      "json": ds.write_json}[fmt]
            t0 = time.perf_counter()
            writer(args.output, mode=args.mode)
            print(f"Wrote {args.output} ({fmt}) in {time.perf_counter() - t0:.2f}s", file=err)
            return EXIT_OK
        from millstream.core.arrow import format_table

        table = ds.limit(args.max_rows + 1).to_arrow()
        print(format_table(table, args.max_rows, truncate=False))
        if table.num_rows > args.max_rows:
            print(f"(only the first {args.max_rows} rows; --max-rows N shows more)", file=err)
        return EXIT_OK
    except OutputExistsError as exc:
        print(f"millstream sql: {cli_spelling(str(exc))}", file=err)
        return EXIT_FAILED
    except MillstreamError as exc:
        print(f"millstream sql: {exc}", file=err)
        return EXIT_FAILED
    finally:
        ms.shutdown()


def _format_of(path: str) -> str:
    from millstream.sql.catalog import format_of

    fmt = format_of(path)
    return fmt if fmt in ("parquet", "csv", "json") else "parquet"


def cli_spelling(message: str) -> str:
    """An error's hint in the command line's words (``--mode overwrite``, not Python's
    ``mode="overwrite"``)."""
    for mode in ("overwrite", "append", "error"):
        message = message.replace(f'mode="{mode}"', f"--mode {mode}").replace(
            f"mode='{mode}'", f"--mode {mode}")
    return message


def version() -> str:
    """The installed package's version (without importing the engine)."""
    try:
        from importlib.metadata import version as dist_version

        return dist_version("millstream")
    except Exception:  # noqa: BLE001 - not installed: the source tree's
        from millstream import __version__

        return __version__


def _size(text: str) -> int:
    from millstream.core.units import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64MB)") from None
    if not value or value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``millstream`` command."""
    parser = argparse.ArgumentParser(prog="millstream", description="Millstream data engine.")
    parser.add_argument("--version", action="version", version=f"millstream {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mr = sub.add_parser("mapreduce", help="run a MapReduceJob over text files",
                        description="Run a MapReduceJob (path/to/job.py:ClassName) over text "
                                    "input; keys are (path, byte offset), values the lines.")
    mr.add_argument("job", help="path/to/job.py:ClassName (or module.name:ClassName)")
    mr.add_argument("input", nargs="+", help="input files, directories, globs or URIs")
    mr.add_argument("-o", "--output", required=True, help="output directory (URI)")
    mr.add_argument("--reducers", type=_positive, default=None, help="reduce tasks per step")
    mr.add_argument("--runner", choices=("local", "ray"), default="local")
    mr.add_argument("--address", default=None,
                    help="Ray cluster address (HOST:PORT or 'auto'); default: start a local Ray")
    mr.add_argument("--format", choices=("text", "parquet"), default="text",
                    help="text: json(key)<TAB>json(value) lines; parquet: key/value columns")
    mr.add_argument("--mode", choices=("error", "overwrite", "append"), default="error",
                    help="when the output exists: fail (default), replace it, or add to it")
    mr.add_argument("--parallelism", type=_positive, default=None, help="worker processes")
    mr.add_argument("--memory-limit", default=None, help="e.g. 2GB (shared by the workers)")
    mr.add_argument("--max-task-attempts", type=_positive, default=None)
    mr.add_argument("--split-size", type=_size, default=None,
                    help="bytes of text per map task (default: input size / (2 x workers))")
    mr.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="live progress bars (default: when stderr is a terminal)")
    mr.set_defaults(func=cmd_mapreduce)
    ui = sub.add_parser("ui", help="serve the dashboard for finished jobs (history server)",
                        description="Serve the dashboard's pages for the jobs whose event logs "
                                    "(ms.init(event_log_dir=...)) are in DIR.")
    ui.add_argument("--history", required=True, metavar="DIR",
                    help="the event log directory (a path or storage URI)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (not loopback: a token is required)")
    ui.add_argument("--port", type=int, default=18080, help="port (0: a free one)")
    ui.set_defaults(func=cmd_ui)


    sq = sub.add_parser("sql", help="run a SQL query",
                        description="Run SQL (DuckDB's dialect by default) over files named in "
                                    "FROM ('data/*.parquet') or registered with --table; print "
                                    "the result, write it with -o, or print the plans.")
    sq.add_argument("query", nargs="?", default=None, help="the SQL text (or use -f)")
    sq.add_argument("-f", "--file", default=None, help="read the SQL from this file")
    sq.add_argument("-o", "--output", default=None,
                    help="write the result here (format from the extension, or --format)")
    sq.add_argument("--format", choices=("parquet", "csv", "json"), default=None)
    sq.add_argument("--mode", choices=("error", "overwrite", "append"), default="error",
                    help="when the output exists: fail (default), replace it, or add to it")
    sq.add_argument("-t", "--table", action="append", metavar="NAME=PATH",
                    help="a table the query names, read from files (repeatable)")
    sq.add_argument("--explain", action="store_true", help="print the plans instead of running")
    sq.add_argument("--dialect", default=None, help="SQL dialect (duckdb, spark, postgres ...)")
    sq.add_argument("--max-rows", type=_positive, default=50, help="rows to print")
    sq.add_argument("--runner", choices=("local", "ray"), default="local")
    sq.add_argument("--address", default=None,
                    help="Ray cluster address (HOST:PORT or 'auto'); default: start a local Ray")
    sq.add_argument("--parallelism", type=_positive, default=None, help="worker processes")
    sq.add_argument("--memory-limit", default=None, help="e.g. 2GB (shared by the workers)")
    sq.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="live progress bars (default: when stderr is a terminal)")
    sq.set_defaults(func=cmd_sql)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``millstream`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except CliError as exc:
        print(f"millstream {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
