"""``egma-bench``: compare every implementation of the EGMA loss on this machine.

    egma-bench                       # the default sweep for this machine (cpu or gpu), Markdown table on stdout
    egma-bench --smoke               # a few seconds: the CI sweep
    egma-bench --sizes egma,p196 --providers loop,reference --modes full --repeats 20
    egma-bench --plot --out results/ # JSON lines, the table and PNG charts in results/
    egma-bench --list                # sizes, sweeps and the providers available here
    egma-bench --render results/results.jsonl   # the table of saved results (no measuring)
    egma-bench --selfcheck           # every fused backend here against the float64 reference; a report file
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from typing import List, Optional

from ..cli_support import HelpFormatter, choose_threads  # noqa: F401 (bench.cli.HelpFormatter: an alias)
from ..cli_support import idle_cores as _idle_cores  # noqa: F401 (an alias for one release)
from .sweeps import MODES, SIZES, SWEEPS, default_sweep_name, parse_size


def _csv(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _split_sizes(text: Optional[str]) -> Optional[List[str]]:
    """Comma-separated sizes, where an ad-hoc size's own ``key=value`` fields continue the previous item."""
    items: List[str] = []
    for tok in _csv(text) or []:
        if items and "=" in tok and ":" not in tok and ":" in items[-1]:
            items[-1] += "," + tok
        else:
            items.append(tok)
    return items or None


def _sweep_values(field: str) -> str:
    """A sweep field as the help says it: "10 (cpu), 20 (gpu)"."""
    vals = []
    for name in ("cpu", "gpu"):
        v = getattr(SWEEPS[name], field)
        vals.append(f"{','.join(v) if isinstance(v, tuple) else v} ({name})")
    return ", ".join(vals)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="egma-bench",
        description="Benchmark every implementation of the EGMA loss (fine_grained_loss) and the FILIP similarity "
        "available here: time (forward, backward, forward+backward), peak and scratch memory, error against "
        "the float64 reference, and the ratio to a bare matmul (the floor). The table goes to stdout, progress "
        "to stderr.",
        formatter_class=HelpFormatter,
        epilog="Sizes: " + ", ".join(f"{n} ({s.describe()})" for n, s in SIZES.items())
        + ". Ad-hoc sizes: loss:B=64,P=49[,D=512,max_sent=10,gaze_fraction=0.5] or similarity:B=800,P=49,reports=20."
        + " Sweeps: " + "; ".join(f"{n}: sizes {','.join(sw.sizes)}, dtypes {','.join(sw.dtypes)}" for n, sw in SWEEPS.items())
        + ".",
    )
    p.add_argument("--sweep", choices=sorted(SWEEPS), help="named sweep (default: gpu with a CUDA device, else cpu)")
    p.add_argument("--smoke", action="store_true", help="the tiny CI sweep, seconds (same as --sweep smoke)")
    p.add_argument("--sizes", help="comma-separated sizes (names or ad-hoc specs) replacing the sweep's (default: "
                   f"the sweep's, {_sweep_values('sizes')})")
    p.add_argument("--providers", help="comma-separated providers (default: loop, reference, reference-compiled and "
                   "every fused backend available here)")
    p.add_argument("--modes", help=f"comma-separated modes out of {','.join(MODES)}, full = forward+backward "
                   "(default: all three)")
    p.add_argument("--dtypes", help="comma-separated dtypes out of float32, bfloat16, float16, float64 (default: the "
                   f"sweep's, {_sweep_values('dtypes')})")
    p.add_argument("--repeats", type=int, help=f"timed runs per measurement, at most (default: {_sweep_values('repeats')})")
    p.add_argument("--warmup", type=int, help=f"untimed runs before each measurement (default: {_sweep_values('warmup')})")
    p.add_argument("--max-time", type=float, dest="max_time", help="seconds after which a measurement stops repeating "
                   f"(default: {_sweep_values('max_time_s')})")
    p.add_argument("--min-repeats", type=int, dest="min_repeats",
                   help=f"timed runs at least, whatever --max-time says (default: {_sweep_values('min_repeats')})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run; auto = cuda when a GPU is visible, else cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default on a CPU: torch's own number, lowered to "
                   "the cores other work leaves idle, at least 1; the choice is printed)")
    p.add_argument("--no-compile", action="store_true", help="leave out reference-compiled (compiling is slow on a CPU)")
    p.add_argument("--compile-sizes", dest="compile_sizes",
                   help="sizes at which reference-compiled runs, or 'all' (default: the sweep's, egma)")
    p.add_argument("--no-compat", action="store_true",
                   help="run the loss with egma_compat=False (the package default); the loop provider is then skipped. "
                   "Without it every provider computes egma_compat=True, the function of the original code.")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--no-errors", action="store_true", help="skip the error check against float64")
    p.add_argument("--budget", type=float, help="seconds after which no new measurement starts, the rest recorded "
                   "as skipped (default: no limit)")
    p.add_argument("--out", help="folder for results.jsonl, results.md and the charts, created (default: none, the "
                   "table on stdout only)")
    p.add_argument("--jsonl", help="also write the JSON lines to this file, '-' = to stdout instead of the table "
                   "(default: none)")
    p.add_argument("--plot", action="store_true", help="write PNG charts (time and memory against size) into --out, "
                   "or egma-bench-plots without it (needs matplotlib, checked first)")
    p.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    p.add_argument("--selfcheck", action="store_true", help="measure nothing: check every fused backend available "
                   "on the device against the float64 reference (forward and backward, float32/bfloat16/float16, the "
                   "kernels' code paths; docs/selfcheck.md), print a verdict per backend and write --report. About a "
                   "minute on a GPU. Exit status 1 when a backend fails. Run it first on a new card")
    p.add_argument("--report", default="egma-selfcheck.json",
                   help="the --selfcheck report file (JSON: device, driver, versions, kernel source hash, every case's "
                   "error against its tolerance) to attach to a bug report")
    p.add_argument("--list", action="store_true", help="list sizes, sweeps and available providers, then exit")
    p.add_argument("--render", metavar="JSONL", help="measure nothing: print the table of saved JSON lines, with "
                   "--plot also charts into --out (default: measure)")
    return p


def _list(device) -> int:
    from .providers import discover

    print("sizes:")
    for name, s in SIZES.items():
        print(f"  {name:16s} {s.kind:10s} {s.describe()}")
    print("sweeps:")
    for name, sw in SWEEPS.items():
        print(f"  {name:8s} sizes={','.join(sw.sizes)} dtypes={','.join(sw.dtypes)}  {sw.note}")
    providers, notes = discover(device)
    print(f"providers on {device.type}: " + ", ".join(p.name for p in providers))
    for n in notes:
        print("  " + n)
    return 0


def _render(args) -> int:
    from .report import markdown_table, read_jsonl, summary, write_plots

    records = read_jsonl(args.render)
    sys.stdout.write(markdown_table(records) + summary(records))
    if args.plot:
        try:
            for path in write_plots(records, args.out or os.path.dirname(os.path.abspath(args.render))):
                print(f"wrote {path}", file=sys.stderr)
        except RuntimeError as exc:
            print(f"egma-bench: {exc}", file=sys.stderr)
            return 1
    return 0


def _selfcheck(args, device) -> int:
    """``--selfcheck``: the verdict per backend on stdout, the report in ``--report``; 1 when a backend fails."""
    from .. import selfcheck

    names, missing = selfcheck.backends_to_check(device)
    wanted = _csv(args.providers)
    if wanted is not None:
        unknown = [n for n in wanted if n not in names]
        if unknown:
            why = "; ".join(f"{n}: {missing[n]}" for n in unknown if n in missing)
            print(f"egma-bench: --selfcheck: {', '.join(unknown)} not available on {device.type} "
                  f"(fused backends here: {', '.join(names) or 'none'}){f'. {why}' if why else ''}", file=sys.stderr)
            return 2
        names = wanted
    progress = None if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    try:
        selfcheck.write_json_atomically(args.report, {"format": "egma-kernels-selfcheck/1", "complete": False})
    except OSError as exc:  # before the minute of checking, not after it
        print(f"egma-bench: cannot write the report {args.report}: {exc}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        # The poisoned (NaN) output buffers make Triton's interpreter warn about NaN arithmetic.
        warnings.simplefilter("ignore", RuntimeWarning)
        # The report is rewritten after each case: a run stopped by a time limit leaves what it checked.
        report = selfcheck.full_check(device, names, progress=progress,
                                      on_update=lambda partial: selfcheck.write_json_atomically(args.report, partial))
    selfcheck.write_json_atomically(args.report, report)
    env = report["environment"]
    print(f"egma-kernels self-check on {env['name']} ({env['arch']}), torch {env['torch']}, "
          f"triton {env['triton'] or 'not installed'}, CUDA {env['torch_cuda'] or 'none'}"
          + (f", driver {env['driver']}" if env.get("driver") else ""))
    for line in selfcheck.verdict_lines(report):
        print(line)
    if not report["backends"]:
        print(f"no fused backend to check on {device.type}")
    verdict = "PASS" if report["passed"] else "FAIL: attach the report file to a bug report (docs/selfcheck.md)"
    print(f"{verdict}; report written to {args.report} ({report['seconds']:.1f} s)")
    return 0 if report["passed"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        # Before measuring anything: a sweep of minutes should not end in a missing-dependency error.
        from .report import check_plotting

        try:
            check_plotting()
        except RuntimeError as exc:
            print(f"egma-bench: {exc}", file=sys.stderr)
            return 2
    if args.render:
        return _render(args)
    from .timing import quiet_profiler_logs

    quiet_profiler_logs()
    import torch

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("egma-bench: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
    if args.list:
        return _list(device)
    if args.selfcheck:
        return _selfcheck(args, device)
    if args.threads is not None and args.threads < 1:
        print("egma-bench: --threads must be at least 1", file=sys.stderr)
        return 2

    sweep = SWEEPS["smoke" if args.smoke else (args.sweep or default_sweep_name(device.type))]
    threads_before = torch.get_num_threads()
    threads = args.threads or sweep.threads
    threads_note = None
    if threads:
        threads_note = f"{threads} ({'--threads' if args.threads else 'the ' + sweep.name + ' sweep'})"
    elif device.type == "cpu":
        threads, why = choose_threads(threads_before)
        threads_note = why
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, sweep, device, threads_note)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, sweep, device, threads_note=None) -> int:
    from . import harness
    from .providers import LossOptions, discover
    from .report import markdown_table, summary, to_json_line, write_plots

    try:
        sizes = [parse_size(s) for s in (_split_sizes(args.sizes) or sweep.sizes)]
        modes = _csv(args.modes) or list(sweep.modes)
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
        dtypes = _csv(args.dtypes) or list(sweep.dtypes)
        from .problems import DTYPES

        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            raise ValueError(f"unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
        providers, notes = discover(device, _csv(args.providers), include_compiled=not args.no_compile)
    except ValueError as exc:
        print(f"egma-bench: {exc}", file=sys.stderr)
        return 2
    compile_sizes = sweep.compile_sizes
    if args.compile_sizes is not None:
        compile_sizes = None if args.compile_sizes == "all" else tuple(_csv(args.compile_sizes))
    elif args.sizes is not None and args.providers is not None and "reference-compiled" in _csv(args.providers):
        compile_sizes = None  # asked for explicitly: run it at every size asked for

    cfg = harness.RunConfig(
        sizes=sizes,
        providers=providers,
        modes=modes,
        dtypes=dtypes,
        device=device,
        repeats=args.repeats or sweep.repeats,
        warmup=sweep.warmup if args.warmup is None else args.warmup,
        max_time_s=sweep.max_time_s if args.max_time is None else args.max_time,
        min_repeats=sweep.min_repeats if args.min_repeats is None else args.min_repeats,
        compile_sizes=compile_sizes,
        options=LossOptions(egma_compat=not args.no_compat),
        measure_memory=not args.no_memory,
        check_errors=not args.no_errors,
        budget_s=args.budget,
        sweep=sweep.name if args.sizes is None else f"{sweep.name}+custom",
    )
    progress = harness.Progress(harness.count_measurements(cfg), enabled=not args.quiet)
    progress.note(
        f"egma-bench: sweep {cfg.sweep} on {device.type}; providers {', '.join(p.name for p in providers)}; "
        f"sizes {', '.join(s.name for s in sizes)}; dtypes {', '.join(dtypes)}"
    )
    for n in notes:
        progress.note(n)
    if threads_note:
        progress.note(f"torch CPU threads: {threads_note}")
    if device.type == "cpu":
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        cores = os.cpu_count() or 1
        if load > 0.75 * cores:
            progress.note(
                f"warning: this machine is busy (load average {load:.1f} on {cores} cores): CPU timings will be "
                f"noisy, small-op providers most of all"
            )

    out_files = []
    jsonl_streams = []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "results.jsonl")
        jsonl_streams.append(open(path, "w"))
        out_files.append(path)
    if args.jsonl and args.jsonl != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
        jsonl_streams.append(open(args.jsonl, "w"))
        out_files.append(args.jsonl)

    def on_record(rec):
        line = to_json_line(rec)
        for s in jsonl_streams:
            s.write(line + "\n")
            s.flush()
        if args.jsonl == "-":
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    start = time.perf_counter()
    try:
        with _library_messages_held(progress):
            records = harness.run(cfg, progress=progress, on_record=on_record)
    except KeyboardInterrupt:
        print("egma-bench: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.close()
        for s in jsonl_streams:
            s.close()

    table = markdown_table(records) + summary(records)
    if args.jsonl != "-":
        sys.stdout.write(table)
        sys.stdout.flush()
    if args.out:
        path = os.path.join(args.out, "results.md")
        with open(path, "w") as f:
            f.write(table)
        out_files.append(path)
    if args.plot:
        try:
            out_files += write_plots(records, args.out or "egma-bench-plots")
        except RuntimeError as exc:
            print(f"egma-bench: {exc}", file=sys.stderr)
            return 1
    progress.note(f"done in {time.perf_counter() - start:.1f} s" + (f"; wrote {', '.join(out_files)}" if out_files else ""))
    failed = [r for r in records if r.get("status") == "error"]
    if failed:
        progress.note(f"{len(failed)} measurement(s) failed (status 'error' in the results)")
    return 1 if failed else 0


@contextlib.contextmanager
def _library_messages_held(progress):
    """Hold back the warnings and log lines that torch/inductor print while compiling and measuring (they
    would land between the progress lines and the table); count them in one line at the end."""
    import logging

    # torch._logging gives some of its loggers their own level, so the parent's level alone does not do.
    names = ["torch"] + [n for n in logging.root.manager.loggerDict if n.startswith("torch.")]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for n, level in saved.items():
                logging.getLogger(n).setLevel(level)
    if caught:
        kinds = sorted({f"{w.category.__name__}: {_first_words(str(w.message), 100)}" for w in caught})
        progress.note(f"{len(caught)} library warning(s) held back, {len(kinds)} distinct; first: {kinds[0]}")


def _first_words(text: str, width: int) -> str:
    """The first line of ``text``, cut at a word boundary to at most ``width`` characters (then " ...")."""
    lines = text.strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) <= width:
        return line
    cut = line.rfind(" ", 0, width + 1)
    return (line[:cut] if cut > 0 else line[:width]).rstrip() + " ..."


if __name__ == "__main__":
    sys.exit(main())
