"""The grid runner: train (task, method, seed) runs and write one record per run the moment it ends.

  run_glue_grid   a simple one-process grid (any mode, any task list): tests and fast mode.
  run_cpu_grid    the CPU protocol's runner: a job list (protocol v1 or v2: the learning-rate search on
                  held-out data, then 5 tasks x 3 methods x 3 seeds; or the diagnosis), several 1-thread
                  worker processes (`benchmark.py run-one`), a checkpoint after every epoch, a progress
                  line with an ETA. Stop it at any moment; the same command resumes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import protocol as P
from bench.protocol import (FAST_RESULTS, HERE, LR_FACTORS, LR_SEARCH_TASKS, METHODS, REPO, RESULTS, SEEDS,
                            TASKS, append_record, helpers, learning_rates, read_records)

_load_task, grid_settings, train_one = P._load_task, P.grid_settings, P.train_one   # patched by tests


# ------------------------------------------------------------------------------------------------
# One process: run_glue_grid

def run_glue_grid(tasks=TASKS, methods=METHODS, seeds=SEEDS, mode="full", out_path=None,
                  device=None, resume=True, max_minutes=None, log=print, **override) -> list[dict]:
    """Train every (task, method, seed) and append one record per run to `out_path` as it finishes.

    A record: task, method, seed, metric (its name), best / last (best-epoch / last-epoch dev value),
    trainable_params_avg (time-averaged trainable parameters, classifier excluded), wall_s (training
    plus the per-epoch dev evaluations), device, mode; and the settings, step_ms, dev_history, versions,
    and for AFLoRA frozen_at ({matrix: step}) with the schedule. resume=True skips runs whose
    (task, method, seed, mode) is already in the file. max_minutes: start no run that would likely end
    past this budget (estimated from the longest finished run of the same task, else of any task). `override`: settings
    for grid_settings (e.g. train_limit=500, epochs=3). Returns the records written by this call.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quiet, log = log is None, log or (lambda s: None)
    if out_path is None:
        out_path = FAST_RESULTS / f"glue_{mode}_{device.type}.json"
    out_path = Path(out_path)
    tasks = [helpers.task_name(t) for t in tasks]
    for m in methods:
        learning_rates(m, tasks[0])  # validates the method names up front
    start, written = time.perf_counter(), []
    done = {(r["task"], r["method"], r["seed"], r["mode"]) for r in read_records(out_path)} if resume else set()
    todo = [(t, m, s) for t in tasks for s in seeds for m in methods if (t, m, s, mode) not in done]
    log(f"grid: {len(todo)} runs to do, {len(tasks) * len(methods) * len(seeds) - len(todo)} already in "
        f"{out_path} (mode {mode}, device {device.type})")
    for task in tasks:
        runs = [(m, s) for t, m, s in todo if t == task]
        if not runs:
            continue
        settings = grid_settings(task, mode, **override)
        train_ex, dev_ex = _load_task(task, settings)
        for method, seed in runs:
            elapsed = (time.perf_counter() - start) / 60
            prior = [r for r in read_records(out_path) if r["mode"] == mode]
            walls = [r["wall_s"] for r in prior if r["task"] == task] or [r["wall_s"] for r in prior]
            est = 1.15 * max(walls) / 60 + 0.1 if walls else 0.0  # same task, else any task
            if max_minutes is not None and elapsed + est > max_minutes:
                left = len(todo) - len(written)
                log(f"stopping: {elapsed:.1f} min used, next run ~{est:.1f} min, budget {max_minutes} min; "
                    f"{left} runs left (rerun the same command to resume)")
                return written
            log(f"[{elapsed:5.1f} min] {task} {method} seed {seed}: {settings['epochs']} epochs, "
                f"{len(train_ex)} train / {len(dev_ex)} dev examples")
            with _quiet_stdout(quiet):
                rec = train_one(task, method, seed, settings, device, train_ex, dev_ex)
            rec["mode"] = mode
            rec["overrides"] = {k: v for k, v in override.items() if v is not None}
            append_record(out_path, rec)
            written.append(rec)
            log(f"    best {rec['metric']} {rec['best']:.4f}  last {rec['last']:.4f}  params "
                f"{rec['trainable_params_avg']:,.0f}  wall {rec['wall_s']:.1f} s")
    log("grid complete" if len(written) == len(todo) else "grid incomplete")
    return written



# ------------------------------------------------------------------------------------------------
# The CPU grid: jobs, their files, the learning-rate choice, one job, the worker pool
#
# A job: dict(kind, task, method, seed, lr_factor, split, protocol, arm). kind "lr_search" (trained on
# the 90% part of the training split, scored on the held-out 10%), "grid" (trained on the training
# split, scored on the GLUE dev set) or "diagnosis" (held-out, like the search). protocol "v1" or "v2"
# (PROTOCOLS), or "diagnosis" (bench/diagnosis.py's arms). lr_factor None: the search's choice.

# Each protocol's changes to grid_settings("cpu") and its files. v1 is the first grid's protocol;
# v2 is written down in the README ("Protocol v2") before any of its runs.
#   v1  the head at 4e-3 (ELoRA, AFLoRA) or the adapter rate (LoRA), 6% warm-up, one factor per method
#       from LR_FACTORS chosen on held-out SST-2 and STS-B.
#   v2  the released head ratios for every method, the warm-up rule the diagnosis chose
#       (diagnosis.warmup_choice), one factor per (method, task) chosen on each task's held-out 10%
#       from V2_FACTORS, the range widened by x3 at an edge (v2_search).
V2_FACTORS, V2_MAX_WIDEN = (1 / 3, 1.0, 3.0), 2


V2_DECISION = "protocol_v2.json"          # v2's warm-up decision, written once when v2 first starts


def decide_v2_warmup() -> dict:
    """Protocol v2's warm-up floor, decided once: read from results/protocol_v2.json if it is there,
    else decided by diagnosis.warmup_choice from the finished diagnosis and written there (with its
    reason and how many diagnosis records it used), so that a later or longer diagnosis can never change
    it between v2's search and its grid. Raises while the diagnosis is unfinished."""
    path = RESULTS_DIR / V2_DECISION
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from bench import diagnosis
    recs = read_records(RESULTS_DIR / DIAGNOSIS_FILE)
    floor, why = diagnosis.warmup_choice(recs)
    decision = dict(warmup_floor=floor, why=why, diagnosis_records=len(recs),
                    decided=time.strftime("%Y-%m-%d %H:%M:%S"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(decision, indent=1) + "\n", encoding="utf-8")
    return decision


def _v2_settings() -> dict:
    return dict(head_rule="released", warmup_floor=decide_v2_warmup()["warmup_floor"])


PROTOCOLS = {
    "v1": dict(settings=lambda: dict(head_rule="v1", warmup_floor=0), search="lr_search_cpu.json",
               grid="glue_cpu.json"),
    "v2": dict(settings=_v2_settings, search="lr_search_cpu_v2.json", grid="glue_cpu_v2.json",
               choose=lambda recs: v2_choices(recs)),
}
DIAGNOSIS_FILE = "diagnosis_cpu.json"
RESULTS_DIR = RESULTS
PLAN_CPU = RESULTS / "grid_plan_cpu.json"
GLUE_CPU, LR_SEARCH_CPU = RESULTS / "glue_cpu.json", RESULTS / "lr_search_cpu.json"   # protocol v1's
WORK = RESULTS / "work"                      # git-ignored logs; per-epoch checkpoints of unfinished runs


def set_results_dir(path) -> None:
    """Write the CPU grid's files under another folder (tests and smoke runs)."""
    global RESULTS_DIR, GLUE_CPU, LR_SEARCH_CPU, WORK
    RESULTS_DIR = Path(path)
    GLUE_CPU, LR_SEARCH_CPU, WORK = RESULTS_DIR / "glue_cpu.json", RESULTS_DIR / "lr_search_cpu.json", \
        RESULTS_DIR / "work"


def results_file(protocol: str, kind: str) -> Path:
    """The file a job's record goes to."""
    if protocol == "diagnosis":
        return RESULTS_DIR / DIAGNOSIS_FILE
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS)} or 'diagnosis'")
    return RESULTS_DIR / PROTOCOLS[protocol]["search" if kind == "lr_search" else "grid"]


def v2_search(records, method: str, task: str) -> tuple[list[float], float | None]:
    """Protocol v2's search on one (method, task): (the factors to run, the chosen factor or None while
    runs are missing). Start from V2_FACTORS; when the best held-out score (best epoch) is at the
    largest or smallest factor tried, add the next one x3 beyond it, at most V2_MAX_WIDEN times. Ties go
    to the factor closest to 1. Never looks at a dev set."""
    score = {}
    for r in records:
        if r["method"] == method and r["task"] == task:
            score[r["lr_factor"]] = r["best"]

    def get(f):
        return next((v for k, v in score.items() if math.isclose(k, f)), None)
    factors = list(V2_FACTORS)
    while True:
        if any(get(f) is None for f in factors):
            return factors, None
        best = max(factors, key=lambda f: (round(get(f), 6) if math.isfinite(get(f)) else -math.inf,
                                           -abs(math.log(f))))
        if len(factors) - len(V2_FACTORS) >= V2_MAX_WIDEN or min(factors) < best < max(factors):
            return factors, best
        factors = [best / 3] + factors if best == min(factors) else factors + [best * 3]


def v2_choices(records) -> dict:
    """{(method, task): factor} for every (method, task) whose v2 search is finished."""
    pairs = {(r["method"], r["task"]) for r in records}
    out = {k: v2_search(records, *k)[1] for k in pairs}
    return {k: f for k, f in out.items() if f is not None}


def cpu_jobs(seeds=SEEDS, methods=METHODS, tasks=TASKS, protocol="v1") -> list[dict]:
    """Every run of a protocol, in the order they start: the learning-rate search (seed 0, each factor,
    held-out split), then the grid seed by seed (so a grid cut short still has whole seeds).
    v1 searches LR_SEARCH_TASKS for one factor per method; v2 every task, one factor per (method, task),
    so its job list grows when a search widens its range (the runner asks again after every run).
    v2's settings need its warm-up decision (decide_v2_warmup): it raises while the diagnosis is unfinished."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    if protocol == "v1":
        jobs = [dict(kind="lr_search", task=t, method=m, seed=0, lr_factor=f, split="heldout")
                for m in methods for t in LR_SEARCH_TASKS for f in LR_FACTORS]
    else:
        PROTOCOLS[protocol]["settings"]()              # v2: refuses to start before its warm-up decision
        search = read_records(results_file(protocol, "lr_search"))
        jobs = [dict(kind="lr_search", task=t, method=m, seed=0, lr_factor=f, split="heldout")
                for t in tasks for m in methods for f in v2_search(search, m, t)[0]]
    jobs += [dict(kind="grid", task=t, method=m, seed=s, lr_factor=None, split="dev")
             for s in seeds for t in tasks for m in methods]
    return [dict(j, protocol=protocol) for j in jobs]


def _job_name(job) -> str:
    f = "" if job["lr_factor"] is None else f"_lr{job['lr_factor']:.4g}"
    if job.get("protocol") == "diagnosis":
        return f"diag_{job['arm']}_{job['task']}_{job['method']}_s{job['seed']}"
    prefix = "" if job.get("protocol", "v1") == "v1" else f"{job['protocol']}_"
    return f"{prefix}{job['kind']}_{job['task']}_{job['method']}_s{job['seed']}{f}"


def _job_out(job) -> Path:
    return results_file(job.get("protocol", "v1"), job["kind"])


def _job_done(job, records) -> bool:
    for r in records:
        if (r["task"], r["method"], r["seed"], r.get("mode"), r.get("kind"), r.get("protocol", "v1"),
                r.get("arm")) == (job["task"], job["method"], job["seed"], "cpu", job["kind"],
                                  job.get("protocol", "v1"), job.get("arm")):
            if job["lr_factor"] is None or math.isclose(r["lr_factor"], job["lr_factor"]):
                return True
    return False


def choose_lr_factors(records, methods=METHODS) -> dict:
    """Protocol v1: {method: factor}: per method, the factor of LR_FACTORS with the highest mean
    held-out score (best epoch) over LR_SEARCH_TASKS; a method whose search is incomplete is left out.
    Ties go to the factor closest to 1. Never looks at a dev set."""
    chosen = {}
    for m in methods:
        means = {}
        for f in LR_FACTORS:
            v = [r["best"] for r in records if r["method"] == m and math.isclose(r["lr_factor"], f)
                 and r["task"] in LR_SEARCH_TASKS]
            if len(v) == len(LR_SEARCH_TASKS):
                means[f] = statistics.mean(v)
        if len(means) == len(LR_FACTORS):
            chosen[m] = max(means, key=lambda f: (round(means[f], 6), -abs(math.log(f))))
    return chosen


def lr_search_table(records) -> str:
    """Protocol v1's search table: held-out score per method, factor and task, the mean, the choice."""
    chosen = choose_lr_factors(records)
    lines = [f"{'method':8s} {'factor':>7s} " + "".join(f"{t + ' lr':>11s}" for t in LR_SEARCH_TASKS) +
             f" {'head lr':>8s} " +
             "".join(f"{t:>9s}" for t in LR_SEARCH_TASKS) + f"{'mean':>9s}  chosen"]
    for m in METHODS:
        for f in LR_FACTORS:
            rs = {r["task"]: r for r in records if r["method"] == m and math.isclose(r["lr_factor"], f)}
            if not rs:
                continue
            lrs = "".join(f"{learning_rates(m, t, f)[0]:11.2e}" for t in LR_SEARCH_TASKS)
            head = learning_rates(m, LR_SEARCH_TASKS[0], f)[1]
            vals = [rs[t]["best"] if t in rs else None for t in LR_SEARCH_TASKS]
            mean = statistics.mean(vals) if None not in vals else None
            lines.append(f"{m:8s} {f:7.3g} {lrs} {head:8.1e} " +
                         "".join(f"{'-' if v is None else f'{v:.4f}':>9s}" for v in vals) +
                         f"{'-' if mean is None else f'{mean:.4f}':>9s}  {'<-' if chosen.get(m) == f else ''}".rstrip())
    return "\n".join(lines)


def chosen_factor(job) -> float | None:
    """The learning-rate factor a job trains at: its own, or (grid jobs) its protocol's search choice;
    None while that search is unfinished."""
    if job["lr_factor"] is not None:
        return job["lr_factor"]
    protocol = job.get("protocol", "v1")
    search = read_records(results_file(protocol, "lr_search"))
    choose = PROTOCOLS[protocol].get("choose")
    if choose is None:                                   # v1: one factor per method
        return choose_lr_factors(search).get(job["method"])
    return choose(search).get((job["method"], job["task"]))


def job_settings(job, **override) -> dict:
    """grid_settings of a job: the CPU protocol with its protocol's (or diagnosis arm's) changes."""
    if job.get("protocol") == "diagnosis":
        from bench import diagnosis
        changes = diagnosis.ARMS[job["arm"]]["settings"]
    else:
        changes = PROTOCOLS[job.get("protocol", "v1")]["settings"]()
    return grid_settings(job["task"], "cpu", **{**changes, **override})


def run_job(job, device="cpu", log=print, **override) -> dict:
    """Run one job in this process (resuming from its checkpoint) and append its record.
    `override`: grid_settings overrides, for smoke tests only (recorded in the record)."""
    task = helpers.task_name(job["task"])
    settings = job_settings(job, **override)
    factor = chosen_factor(job)
    if factor is None:
        raise RuntimeError(f"the learning-rate search for {job['method']} on {task} is not finished "
                           f"({results_file(job.get('protocol', 'v1'), 'lr_search')}); run the search first")
    train_ex, dev_ex = _load_task(task, settings, split=job["split"])
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = WORK / f"{_job_name(job)}.pt"
    probe = None
    if job.get("protocol") == "diagnosis":
        from bench import diagnosis
        probe = diagnosis.make_probe()
    rec = train_one(task, job["method"], job["seed"], settings, torch.device(device), train_ex, dev_ex,
                    lr_factor=factor, checkpoint=ckpt, log=log, probe=probe,
                    eval_name="held-out" if job["split"] == "heldout" else "dev")
    rec.update(mode="cpu", kind=job["kind"], split=job["split"], protocol=job.get("protocol", "v1"),
               smoke_overrides=override or None)
    if job.get("arm"):
        rec.update(arm=job["arm"], arms=job.get("arms", [job["arm"]]))
    append_record(_job_out(job), rec)
    ckpt.unlink(missing_ok=True)
    return rec


def _running_elsewhere() -> set[str]:
    """Names of the jobs that a `benchmark.py run-one` process on this machine is running now for the same
    results folder (e.g. left by an earlier cpu-grid parent), read from /proc, so a restarted parent never
    starts them twice."""
    names = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "run-one" not in argv or not any(a.endswith("benchmark.py") for a in argv):
            continue
        opt = {k: v for k, v in zip(argv, argv[1:]) if k.startswith("--")}
        if Path(opt.get("--results-dir", str(RESULTS))).resolve() != RESULTS_DIR.resolve():
            continue                               # a grid writing to other files (a test, a smoke run)
        try:
            names.add(_job_name(json.loads(opt["--job"])))
        except (KeyError, ValueError, TypeError):
            continue
    return names


def _estimate_s(job, plan) -> float | None:
    """Seconds one job should take from the plan's measured step times (2 threads), or None."""
    p = next((r for r in plan if r["task"] == job["task"] and r["method"] == job["method"]
              and r["autocast"] == "fp32"), None)
    if p is None:
        return None
    epochs = P.CPU_EPOCHS[job["task"]]
    steps = p["steps"] / p["epochs"] * epochs
    if job["task"] in P.CPU_MAX_STEPS:
        steps = min(steps, P.CPU_MAX_STEPS[job["task"]])
    frac = 0.9 if job["split"] == "heldout" else 1.0
    return frac * steps * p["step_ms"] / 1000 + epochs * p["eval_s"]


def diagnosis_then_v2_jobs(seeds=SEEDS) -> list[dict]:
    """The diagnosis's jobs, and once all of them are done, protocol v2's (whose warm-up the finished
    diagnosis decides): one worker pool runs both, so no core waits between the two."""
    from bench import diagnosis
    jobs = diagnosis.diagnosis_jobs(seeds)
    recs = read_records(RESULTS_DIR / DIAGNOSIS_FILE)
    if all(_job_done(j, recs) for j in jobs):
        jobs = jobs + cpu_jobs(seeds, protocol="v2")
    return jobs


def protocol_cost(protocol: str = "v2", workers: int = 2, widen: int = 0) -> dict:
    """What a protocol's search and grid should cost here, before any of its runs: each job's CPU time
    taken from protocol v1's measured runs of the same (task, method) (mean cpu_s of its search runs
    for a held-out run, of its grid runs for a grid run; 0.9 x the grid run for a held-out run of a task
    v1 did not search), else from the plan (results/grid_plan_cpu.json). v2's search
    counts V2_FACTORS per (method, task) plus `widen` extra factors for each. Hours of `workers` 1-thread
    workers: dict(search_h, grid_h, total_h, jobs)."""
    plan = read_records(PLAN_CPU)
    v1 = [r for r in read_records(GLUE_CPU) if r.get("kind") == "grid"]
    v1_search = read_records(LR_SEARCH_CPU)

    def cost(task, method, heldout):
        runs = v1_search if heldout else v1       # a held-out run scores more examples than the dev set
        rs = [r.get("cpu_s") or r["wall_s"] for r in runs if r["task"] == task and r["method"] == method]
        if not rs and heldout:                     # no v1 search run of this task: 0.9 x its grid run
            rs = [0.9 * (r.get("cpu_s") or r["wall_s"]) for r in v1 if r["task"] == task and r["method"] == method]
        if rs:
            return statistics.mean(rs)
        return _estimate_s(dict(task=task, method=method, split="heldout" if heldout else "dev"), plan) or 0.0
    if protocol == "v1":
        search = [(j["task"], j["method"]) for j in cpu_jobs(protocol="v1") if j["kind"] == "lr_search"]
    else:
        search = [(t, m) for t in TASKS for m in METHODS for _ in range(len(V2_FACTORS) + widen)]
    search_s = sum(cost(t, m, True) for t, m in search)
    grid_s = sum(cost(t, m, False) for t in TASKS for m in METHODS for _ in SEEDS)
    return dict(search_h=search_s / 3600 / workers, grid_h=grid_s / 3600 / workers,
                total_h=(search_s + grid_s) / 3600 / workers, jobs=len(search) + len(TASKS) * len(METHODS) * len(SEEDS))


def run_cpu_grid(workers=2, seeds=SEEDS, methods=METHODS, tasks=TASKS, poll_s=10.0, report_s=300.0,
                 nice=5, log=print, results_dir=None, override=None, protocol="v1", jobs=None) -> bool:
    """Run every job not yet in the results files, `workers` at a time, each a 1-thread process
    (`benchmark.py run-one`), logs and checkpoints in results/work/. The jobs: `jobs` (a list, or a
    callable giving the current list), else cpu_jobs(seeds, methods, tasks, protocol). A grid job waits
    until its learning-rate search has chosen its factor. Prints a progress line with an ETA every
    `report_s` seconds. Safe to stop at any moment and start again: finished runs are in the results
    files, unfinished ones resume after their last finished epoch. Returns True when all jobs are done."""
    import subprocess
    if results_dir is not None:
        set_results_dir(results_dir)
    if jobs is None:
        job_list = lambda: cpu_jobs(seeds, methods, tasks, protocol)  # noqa: E731
    else:
        job_list = jobs if callable(jobs) else (lambda: list(jobs))
    all_jobs = job_list()
    plan = read_records(PLAN_CPU)
    WORK.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    running, failed, start, last_report = {}, set(), time.time(), 0.0
    outs = sorted({_job_out(j) for j in all_jobs})

    def records():                  # each record carries its kind, protocol and arm
        return [r for o in outs for r in read_records(o)]

    ratios = [(r.get("cpu_s") or r["wall_s"]) / _estimate_s(j, plan)   # measured / planned, finished jobs
              for j in all_jobs for r in read_records(_job_out(j))[-40:]
              if _job_done(j, [r]) and _estimate_s(j, plan) and not r.get("resumed_from_epoch")]

    def ready(job):
        return chosen_factor(job) is not None

    log(f"cpu grid: {len(all_jobs)} jobs (" + ", ".join(f"{sum(j['kind'] == k for j in all_jobs)} {k}" for k in
                                                       sorted({j["kind"] for j in all_jobs})) +
        f"), {workers} workers x 1 thread; logs in {WORK}")
    while True:
        jobs_now = job_list()
        outs = sorted({_job_out(j) for j in jobs_now})
        for proc, (job, t0, fh) in list(running.items()):
            if proc.poll() is None:
                continue
            fh.close()
            del running[proc]
            name = _job_name(job)
            if proc.returncode != 0 or not _job_done(job, read_records(_job_out(job))):
                failed.add(name)
                log(f"FAILED {name} (exit {proc.returncode}); see {WORK / (name + '.log')}")
            else:
                rec = next(r for r in read_records(_job_out(job))[::-1] if _job_done(job, [r]))
                est = _estimate_s(job, plan)
                if est and not rec.get("resumed_from_epoch"):
                    ratios.append((rec.get("cpu_s") or rec["wall_s"]) / est)   # CPU time: pauses don't count
                log(f"done {name}: best {rec['metric']} {rec['best']:.4f}, last {rec['last']:.4f}, "
                    f"{rec['steps']} steps, wall {rec['wall_s'] / 60:.1f} min")
        recs = records()
        active = {_job_name(j) for j, _, _ in running.values()}
        elsewhere = _running_elsewhere() - active
        todo = [j for j in jobs_now if not _job_done(j, recs) and _job_name(j) not in failed]
        waiting = [j for j in todo if _job_name(j) not in active | elsewhere]
        for job in waiting:
            if len(running) + len(elsewhere) >= workers:
                break
            if not ready(job):
                continue
            name = _job_name(job)
            cmd = [sys.executable, str(HERE / "benchmark.py"), "run-one", "--job", json.dumps(job),
                   "--results-dir", str(RESULTS_DIR)]
            if override:
                cmd += ["--override", json.dumps(override)]
            fh = open(WORK / f"{name}.log", "a")
            proc = subprocess.Popen((["nice", "-n", str(nice)] if nice else []) + cmd, stdout=fh,
                                    stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
            running[proc] = (job, time.time(), fh)
            log(f"start {name}")
        now = time.time()
        if now - last_report >= report_s:
            last_report = now
            c = statistics.median(ratios) if ratios else 1.0
            ests = [(_estimate_s(j, plan) or 0) * c for j in todo]
            for job, t0, _ in running.values():       # subtract what the running jobs have done
                ests.append(-min(now - t0, (_estimate_s(job, plan) or 0) * c))
            eta = max(0.0, sum(ests)) / workers
            n_done = len(jobs_now) - len(todo)
            log(f"[{time.strftime('%H:%M')}] {n_done}/{len(jobs_now)} jobs done, running: "
                f"{', '.join(sorted(active | elsewhere)) or '-'}; elapsed {(now - start) / 3600:.2f} h, "
                f"ETA {eta / 3600:.1f} h on a quiet machine (CPU time = plan x {c:.2f})")
        if not running and elsewhere:              # only jobs of an earlier parent are left running
            time.sleep(poll_s)
            continue
        if not running:
            if todo:
                log(f"stopped: {len(todo)} jobs left, none can start ({len(failed)} failed)")
            else:
                log("cpu grid complete")
            return not todo
        time.sleep(poll_s)


@contextlib.contextmanager
def _quiet_stdout(quiet: bool):
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


