"""Reading the results: summaries of a grid, the targets (the paper's claims, met or missed), the
paper's numbers, and the README's "Results" section generated from the committed files only."""
from __future__ import annotations

import functools
import json
import math
import statistics

import numpy as np

from bench import grid as G
from bench import protocol as P
from bench.protocol import (CPU_EPOCHS, CPU_MAX_STEPS, GRID_RUNS, METHOD_LABELS, METHODS, RESULTS, SEEDS, TASKS,
                            helpers, read_records)
from bench.grid import lr_search_table

# ------------------------------------------------------------------------------------------------
# Summaries, targets, figures


def summarize_glue(records) -> dict:
    """{method: dict(per_task={task: mean best over seeds}, sd={task: sd over seeds}, n={task: seeds},
    mean=mean over tasks, params=mean time-averaged params, wall_s / cpu_s = totals, n_runs)};
    a method missing a task that another method has gets mean None."""
    tasks = sorted({r["task"] for r in records})
    out = {}
    for method in sorted({r["method"] for r in records}, key=lambda m: list(METHOD_LABELS).index(m)
                         if m in METHOD_LABELS else 99):
        rs = [r for r in records if r["method"] == method]
        by_task = {t: [r["best"] for r in rs if r["task"] == t] for t in tasks}
        by_task = {t: v for t, v in by_task.items() if v}
        out[method] = dict(per_task={t: statistics.mean(v) for t, v in by_task.items()},
                           sd={t: statistics.stdev(v) if len(v) > 1 else 0.0 for t, v in by_task.items()},
                           n={t: len(v) for t, v in by_task.items()},
                           mean=statistics.mean(statistics.mean(v) for v in by_task.values())
                           if len(by_task) == len(tasks) else None,
                           params=statistics.mean(r["trainable_params_avg"] for r in rs),
                           wall_s=sum(r["wall_s"] for r in rs), cpu_s=sum(r.get("cpu_s") or 0.0 for r in rs),
                           n_runs=len(rs))
    return out


def _run_time(r) -> float:
    """A run's time for comparisons: its process CPU time where recorded (1-thread workers: robust to the
    other jobs on the machine), else its wall time."""
    return r.get("cpu_s") or r["wall_s"]


def _paired_walls(records, a, b):
    """(total time of a, total time of b, pairs) over the (task, seed) pairs both methods have."""
    wa = {(r["task"], r["seed"]): _run_time(r) for r in records if r["method"] == a}
    wb = {(r["task"], r["seed"]): _run_time(r) for r in records if r["method"] == b}
    keys = sorted(set(wa) & set(wb))
    return (sum(wa[k] for k in keys), sum(wb[k] for k in keys), len(keys)) if keys else None


def complete_tasks(records, methods=METHODS, seeds=None) -> list[str]:
    """Tasks on which every method has the same (non-empty) set of seeds: the fair comparison set. With
    `seeds`, only the tasks where that set is exactly `seeds` (protocol v2 reads a task once all are in)."""
    out = []
    for t in TASKS:
        have = [frozenset(r["seed"] for r in records if r["task"] == t and r["method"] == m) for m in methods]
        if have[0] and all(s == have[0] for s in have) and (seeds is None or have[0] == frozenset(seeds)):
            out.append(t)
    return out


def targets(glue_records=None, speed_records=None, glue_source="", speed_source="") -> list[dict]:
    """The targets, each dict(target, value, status, source) with status "met", "missed" or "not measured
    yet". Accuracy on the tasks every method has finished with the same seeds; run time from paired
    runs (process CPU time where recorded). Read from the results; never asserted."""
    rows = []

    def row(target, value, ok, source):
        status = "not measured yet" if ok is None else ("met" if ok else "missed")
        rows.append(dict(target=target, value=value, status=status, source=source))

    recs = glue_records or []
    fair = complete_tasks(recs, ("lora", "aflora")) if recs else []
    g = summarize_glue([r for r in recs if r["task"] in fair]) if fair else {}
    lo, af = g.get("lora"), g.get("aflora")
    if lo and af and lo["mean"] is not None and af["mean"] is not None:
        ratio = lo["params"] / af["params"]
        row("AFLoRA mean >= LoRA mean, with >= 5x fewer time-averaged params",
            f"{af['mean']:.4f} vs {lo['mean']:.4f} ({af['mean'] - lo['mean']:+.4f}) on {len(fair)} task(s); "
            f"{ratio:.1f}x fewer", af["mean"] >= lo["mean"] and ratio >= 5, glue_source)
    else:
        row("AFLoRA mean >= LoRA mean, with >= 5x fewer time-averaged params", "-", None, glue_source)
    pw = _paired_walls(recs, "aflora", "elora")
    if pw:
        row("AFLoRA whole-run time <= 0.6x ELoRA's", f"{pw[0] / pw[1]:.2f}x ({pw[2]} paired runs)",
            pw[0] <= 0.6 * pw[1], glue_source)
    else:
        row("AFLoRA whole-run time <= 0.6x ELoRA's", "-", None, glue_source)
    pw = _paired_walls(recs, "aflora", "lora")
    if pw:
        row("AFLoRA whole-run time <= our LoRA's", f"{pw[0] / pw[1]:.2f}x ({pw[2]} paired runs)",
            pw[0] <= pw[1], glue_source)
    else:
        row("AFLoRA whole-run time <= our LoRA's", "-", None, glue_source)
    grid = [r for r in recs if r.get("kind", "grid") == "grid"]
    if len(grid) >= GRID_RUNS:
        hours = sum(_run_time(r) for r in grid) / 3600 / 2
        row("the grid in <= 8 hours of the 2-core machine", f"{hours:.1f} h (CPU time / 2 cores)", hours <= 8,
            glue_source)
    else:
        row("the grid in <= 8 hours of the 2-core machine", f"{len(grid)} of {GRID_RUNS} runs so far", None, glue_source)

    s = {r["name"]: r for r in speed_records or []}

    def ratio_row(target, a, b, limit):
        if a in s and b in s and s[a]["step_ms"] and s[b]["step_ms"]:
            x = s[a]["step_ms"] / s[b]["step_ms"]
            value = f"{s[a]['step_ms']:.2f} / {s[b]['step_ms']:.2f} ms = {x:.2f}x"
            if all(k in s[n] for n in (a, b) for k in ("p10_ms", "p90_ms")):
                # a's p10-p90 range overlaps limit x b's: the verdict is within the timing noise
                lo_a, hi_a = s[a]["p10_ms"], s[a]["p90_ms"]
                lo_b, hi_b = limit * s[b]["p10_ms"], limit * s[b]["p90_ms"]
                if lo_a <= hi_b and lo_b <= hi_a:
                    value += f" (verdict within noise: the p10-p90 ranges of both, the second x {limit:g}, overlap)"
            row(target, value, x <= limit, speed_source)
        else:
            row(target, "-", None, speed_source)

    ratio_row("our LoRA r=8 step <= PEFT LoRA r=8", "lora8", "peft_lora8", 1.0)
    ratio_row("our ELoRA r=1024 step <= 0.5x PEFT VeRA r=1024", "elora1024", "peft_vera1024", 0.5)
    ratio_row("our ELoRA r=1024 step <= 2.2x the floor", "elora1024", "floor", 2.2)
    ratio_row("AFLoRA frozen step within 1.2x of the floor", "aflora4_frozen", "floor", 1.2)
    if "freezer_overhead" in s:
        pct = s["freezer_overhead"]["pct_of_step"]
        row("freezer < 3% of a step", f"{pct:.2f}%", pct < 3.0, speed_source)
    else:
        row("freezer < 3% of a step", "-", None, speed_source)
    return rows


def format_targets(rows) -> str:
    w = max(len(r["target"]) for r in rows)
    return "\n".join(f"{r['target']:{w}s}  {r['status']:16s}  {r['value']}  [{r['source']}]" for r in rows)


# The paper (Liu et al., ACL 2024, arXiv 2403.13269), Table 1: DeBERTaV3-base, GLUE dev sets.
PAPER = {  # method: (trainable params, {task: score}, average over its 8 GLUE tasks)
    "lora":   ("1.33M", {"CoLA": 69.73, "SST-2": 95.57, "MRPC": 89.71, "STS-B": 91.86, "RTE": 85.32}, 88.38),
    "elora":  ("0.16M", {"CoLA": 70.74, "SST-2": 95.18, "MRPC": 90.93, "STS-B": 91.08, "RTE": 87.36}, 88.53),
    "aflora": ("0.14M", {"CoLA": 72.01, "SST-2": 96.22, "MRPC": 91.91, "STS-B": 91.84, "RTE": 88.09}, 89.23),
}   # AFLoRA's count is time-averaged over training
PAPER_RUNTIME = {"aflora": 0.54, "lora": 0.65, "elora": 1.00}   # whole run, normalised to ELoRA


# HF PEFT on this MiniLM, same data, batch 32, length 128, seed 0, best dev epoch, fp32, one H100: a reference
# for scale (results/peft_reference_h100.json says how it was made).
PEFT_REFERENCE = json.loads((RESULTS / "peft_reference_h100.json").read_text())
PEFT_ANCHOR = {r["task"]: {"peft_lora": r["peft_lora"], "peft_vera": r["peft_vera"]} for r in PEFT_REFERENCE["records"]}


def results_markdown() -> str:
    """The README's "Results" section, generated from the committed result files only (so every number
    in it has a file and a command behind it). tests/test_readme.py checks that the README holds
    exactly this text: regenerate with `python notebooks/benchmark.py readme-results`."""
    search = read_records(G.LR_SEARCH_CPU)
    grid = [r for r in read_records(G.GLUE_CPU) if r.get("kind") == "grid"]
    speed = {r["name"]: r for r in read_records(RESULTS / "speed_cpu.json")}
    out = [f"Status: {len(grid)} of {GRID_RUNS} grid runs and {len(search)} of {len(METHODS) * len(G.LR_SEARCH_TASKS) * len(G.LR_FACTORS)} learning-rate search runs are in "
           "the results files" + (" (the grid is unfinished: the same command resumes it, and this section is regenerated as it fills in)."
                                  if len(grid) < GRID_RUNS else ".")]
    if speed:
        r0 = next(iter(speed.values()))
        out += ["", f"**Step time** ([`speed_cpu.json`](notebooks/results/speed_cpu.json): batch {r0['batch']}, "
                f"length {r0['length']}, {r0['threads']} thread, fp32, forward + backward + AdamW, median of "
                f"{r0['rounds']} interleaved rounds; `{r0.get('command', '')}`):", "",
                "| configuration | s per step | vs floor | trainable params |", "|---|---|---|---|"]
        labels = {"floor": "frozen base (floor)", "peft_lora8": "PEFT LoRA r=8", "peft_vera1024": "PEFT VeRA r=1024",
                  "lora8": "ours, LoRA r=8", "elora1024": "ours, ELoRA r=1024 (auto: weight path)",
                  "elora1024_token": "ours, ELoRA r=1024, token path", "aflora4_start": "ours, AFLoRA r=4 at start",
                  "aflora4_frozen": "ours, AFLoRA r=4, all A, B frozen"}
        for n, label in labels.items():
            if n in speed and speed[n]["step_ms"]:
                out.append(f"| {label} | {speed[n]['step_ms'] / 1000:.2f} | "
                           f"{speed[n]['step_ms'] / speed['floor']['step_ms']:.2f}x | {speed[n]['params']:,} |")
        if "freezer_overhead" in speed:
            fz = speed["freezer_overhead"]
            out += ["", f"AFLoRA's freezer adds {fz['step_ms']:.1f} ms per step ({fz['pct_of_step']:.2f}% of a step)."]
    pad, thr, plan = read_records(RESULTS / "padding_cpu.json"), read_records(RESULTS / "threads_cpu.json"), \
        read_records(G.PLAN_CPU)
    choices = []
    if pad:
        for protocol in ("reference", "cpu"):
            rs = [r for r in pad if r["protocol"] == protocol]
            choices.append(f"- Batches grouped by length: {sum(r['random']['padded'] for r in rs) / 1e6:.1f}M padded tokens "
                           f"per method and seed with random batches, {sum(r['grouped']['padded'] for r in rs) / 1e6:.1f}M "
                           f"grouped ({sum(r['random']['real'] for r in rs) / 1e6:.1f}M real), {protocol.replace('cpu', 'CPU')} budget "
                           "([`padding_cpu.json`](notebooks/results/padding_cpu.json), "
                           "`benchmark.py padding --out notebooks/results/padding_cpu.json`). Used.")
    if thr:
        choices.append(f"- Two 1-thread processes give {thr[0]['ratio']:.2f}x the training throughput of one 2-thread "
                       "process ([`threads_cpu.json`](notebooks/results/threads_cpu.json), "
                       f"`{thr[0]['command'].removeprefix('python notebooks/')}`): "
                       "the grid runs two 1-thread workers.")
    if plan:
        def total(kind):
            return sum(min(r["steps"] / r["epochs"] * CPU_EPOCHS[r["task"]], CPU_MAX_STEPS.get(r["task"], math.inf))
                       * r["step_ms"] for r in plan if r["autocast"] == kind)
        choices.append(f"- bf16 autocast: the plan's step times put a bf16 grid at {total('bf16') / total('fp32'):.2f}x the "
                       "fp32 time ([`grid_plan_cpu.json`](notebooks/results/grid_plan_cpu.json)); not used: the "
                       "3-seed check that bf16 matches fp32 within seed noise would cost about as much as it saves "
                       "at this grid's size, so the grid stays fp32.")
    if "elora1024" in speed and "elora1024_token" in speed:
        r0 = speed["elora1024"]
        line = (f"- ELoRA's weight path: {speed['elora1024_token']['step_ms'] / r0['step_ms']:.2f}x faster steps than "
                f"the token path at r = 1024 on batches of {r0['batch']} x {r0['length']} tokens (the step-time table "
                "above). Used (`path='auto'`), which takes it only where the library's cost rule says it pays")
        paths = read_records(RESULTS / "elora_paths_cpu.json")
        if paths:
            sh = paths[0]["shapes"]
            share = sum(r["weight_share"] * r["steps"] for r in paths) / sum(r["steps"] for r in paths)
            line += (": on batches of more than " + " / ".join(f"{v['weight_from_tokens'] - 1} ({k})" for k, v in sh.items())
                     + f" tokens. In the grid's training batches that is {share:.0%} of ELoRA's layer-steps ("
                     + ", ".join(f"{r['task']} {r['weight_share']:.0%}" for r in paths) + "; the rest take the token "
                     "path; [`elora_paths_cpu.json`](notebooks/results/elora_paths_cpu.json), "
                     "`benchmark.py paths --out notebooks/results/elora_paths_cpu.json`)")
        choices.append(line + ".")
    if choices:
        out += ["", "**What makes a CPU step cheaper**, each kept only if a side-by-side measurement says it pays:", ""] + choices
    if search:
        out += ["", "**Learning rates** ([`lr_search_cpu.json`](notebooks/results/lr_search_cpu.json), held-out "
                "10% of the training split (drawn once with seed 1234), training seed 0; the factor with the best mean "
                "is used on every task; the head's rate is scaled by the same factor):", "",
                "```text", lr_search_table(search), "```"]
    if grid:
        fair = complete_tasks(grid)
        out += ["", "**Accuracy** ([`glue_cpu.json`](notebooks/results/glue_cpu.json), best dev epoch, mean ± sd "
                "over seeds (n); `python notebooks/benchmark.py cpu-grid --workers 2`), with the paper's numbers "
                "(DeBERTaV3-base, its Table 1, in points: 100 x our scale) beside them for scale, not for a "
                "like-for-like comparison:", "",
                "| task | " + " | ".join(METHOD_LABELS[m] for m in METHODS) + " | paper: " +
                " / ".join(METHOD_LABELS[m].split()[0] for m in METHODS) + " |", "|---" * (len(METHODS) + 2) + "|"]

        def paper(values):
            return " / ".join(values) + " |"
        for t in TASKS:
            cells = []
            for m in METHODS:
                v = [r["best"] for r in grid if r["task"] == t and r["method"] == m]
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                cells.append(("pending" if not v else f"{v[0]:.3f} (1)" if len(v) == 1 else
                              f"{statistics.mean(v):.3f} ± {sd:.3f} ({len(v)})"))
            out.append(f"| {t} ({helpers.TASKS[t]['metric']}) | " + " | ".join(cells) + " | "
                       + paper(f"{PAPER[m][1][t]:.1f}" for m in METHODS))
        if fair:
            g = summarize_glue([r for r in grid if r["task"] in fair])
            out.append(f"| mean over {', '.join(fair)} | " + " | ".join(
                f"{g[m]['mean']:.3f}" if m in g and g[m]['mean'] is not None else "-" for m in METHODS) + " | "
                + paper(f"{statistics.mean(PAPER[m][1][t] for t in fair):.1f}" for m in METHODS))
            out.append("| time-averaged trainable params | " + " | ".join(
                f"{g[m]['params']:,.0f}" if m in g else "-" for m in METHODS) + " | "
                + paper(PAPER[m][0] for m in METHODS))
            hours = {m: sum(_run_time(r) for r in grid if r["task"] in fair and r["method"] == m) / 3600
                     for m in METHODS}
            out.append("| whole-run CPU time over these tasks, h (vs ELoRA) | " + " | ".join(
                f"{hours[m]:.2f} ({hours[m] / hours['elora']:.2f}x)" for m in METHODS) + " | "
                + paper(f"({PAPER_RUNTIME[m]:.2f}x)" for m in METHODS))
        af = [r for r in grid if r["method"] == "aflora" and r.get("frozen_at")]
        if af and all(None not in r["frozen_at"].values() for r in af):
            done = [max(r["frozen_at"].values()) / r["steps"] for r in af]
            f0 = af[0]["freezer"]                        # t_i, t_f are the same fractions of T on every task
            out += ["", f"AFLoRA's low-rank matrices train only early in a run: in the {len(af)} AFLoRA runs every A and B "
                    f"was frozen after {min(done):.0%} to {max(done):.0%} of the steps (`frozen_at` in the file). The "
                    f"released schedule freezes whatever is left at T - t_f = {1 - f0['t_final'] / f0['total_steps']:.0%} "
                    "of T, and its quantile rule, taken over the matrices still trainable, compounds and gets there "
                    "sooner; after that only the vectors d, b and the classifier train."]
    rows = {r["target"]: r for r in targets(grid, list(speed.values()), "glue_cpu.json", "speed_cpu.json")}
    acc = rows["AFLoRA mean >= LoRA mean, with >= 5x fewer time-averaged params"]
    run = rows["AFLoRA whole-run time <= 0.6x ELoRA's"]
    final = len(grid) >= GRID_RUNS

    def verdict(r, how=""):
        if r["status"] == "not measured yet":
            return "not measured yet."
        return ("holds" if r["status"] == "met" else "does not hold") + ("" if final else " so far") + \
            f" ({r['value']}{how})."
    gain5 = statistics.mean(PAPER["aflora"][1][t] - PAPER["lora"][1][t] for t in TASKS)
    out += ["", "**The paper's claims on MiniLM, protocol v1** (computed from the files above; >= 5x and <= 0.6x "
            "are this project's targets, set below the paper's 9.5x and 0.54x, and \"matches\" compares the means "
            "with no allowance for the seeds' spread):", "",
            f"- AFLoRA matches or beats LoRA with >= 5x fewer time-averaged parameters (paper: "
            f"{PAPER['aflora'][2] - PAPER['lora'][2]:+.2f} points on the average of its 8 GLUE tasks, {gain5:+.2f} on "
            "our 5, 9.5x fewer): " + verdict(acc),
            "- An AFLoRA run takes <= 0.6x of an ELoRA run (paper: 0.54x): "
            + verdict(run, "; process CPU time of paired runs, against ELoRA with `path='auto'`")]
    pw = _paired_walls(grid, "aflora", "elora")
    if pw and "elora1024" in speed and "elora1024_token" in speed:
        k = speed["elora1024_token"]["step_ms"] / speed["elora1024"]["step_ms"]
        out.append(f"  Against an ELoRA on the token path everywhere (as PEFT's VeRA and the authors' code run it): "
                   f"between {pw[0] / (pw[1] * k):.2f}x and {pw[0] / pw[1]:.2f}x (bounds: ELoRA's time x {k:.2f}, "
                   "the step-time ratio of the two paths at 32 x 128 tokens, and x 1).")
    return "\n".join(out) + "\n"




def diagnosis_markdown() -> str:
    """The README's diagnosis block, from results/diagnosis_cpu.json only (regenerate with
    `python notebooks/benchmark.py readme-results --write`)."""
    from bench import diagnosis as D
    recs = read_records(G.RESULTS_DIR / G.DIAGNOSIS_FILE)
    n_jobs = len(D.diagnosis_jobs())
    out = [f"Status: {len(recs)} of {n_jobs} diagnosis runs are in "
           "[`diagnosis_cpu.json`](notebooks/results/diagnosis_cpu.json)"
           + (" (unfinished: the same command resumes it)." if len(recs) < n_jobs else ".")]
    if recs:
        out += ["", "Columns: `held-out`, the best epoch's score on the held-out split (mean ± sd over seeds (n)); "
                f"`collapsed`, the runs whose feature spread ended below {D.COLLAPSE_RATIO:g}x its value at step 1; "
                "`spread`, the final spread of the classifier's input features (the standard deviation of each "
                f"feature across {D.PROBE_EXAMPLES} fixed held-out examples, averaged over the features; 0 means one "
                "output for every input), mean over seeds; `max |dW|`, the Frobenius norm of the largest "
                "feed-forward ΔW at the end, mean over seeds; `A,B frozen by`, the step by which all of AFLoRA's "
                "A and B were frozen, of T.", "", "```text", D.table(recs), "```"]
        decided = G.RESULTS_DIR / G.V2_DECISION          # once written, the decision v2 runs with
        try:
            why = json.loads(decided.read_text(encoding="utf-8"))["why"] if decided.is_file() \
                else D.warmup_choice(recs)[1]
            out += ["", "Warm-up rule for protocol v2: " + why + "."]
        except RuntimeError:
            out += ["", "Warm-up rule for protocol v2: not decided yet (the released-head and warmup-floor arms "
                    "are unfinished)."]
        if len(recs) == n_jobs:
            out += ["", diagnosis_reading(D.summary(recs))]
    return "\n".join(out) + "\n"


def diagnosis_reading(rows) -> str:
    """The finished diagnosis in a few sentences, every number and every comparison word from its summary
    rows (bench.diagnosis.summary)."""
    row = {(r["arm"], r["task"], r["method"]): r for r in rows}

    def score(arm, task, method):
        r = row[(arm, task, method)]
        return f"{r['mean']:.3f} ± {r['sd']:.3f}"

    def coll(arm):
        r = row[(arm, "STS-B", "aflora")]
        return f"{r['collapsed']} of {len(r['seeds'])}"
    others = [r for r in rows if r["method"] != "aflora"]
    trails = _cola_trails(row)
    adaptive, frozen = row[("released-head", "CoLA", "aflora")], row[("frozen-AB", "CoLA", "aflora")]
    floor = row[("warmup-floor", "STS-B", "aflora")]["warmup_steps"]
    return (f"**Reading.** On held-out STS-B, AFLoRA's pooled features collapsed (one output for every input) in "
            f"{coll('v1-head')} seeds under v1's classifier rate (Pearson {score('v1-head', 'STS-B', 'aflora')}), in "
            f"{coll('released-head')} with the released rate alone ({score('released-head', 'STS-B', 'aflora')}) and in "
            f"{coll('warmup-floor')} with the released rate and a {floor}-step warm-up "
            f"({score('warmup-floor', 'STS-B', 'aflora')}; LoRA {score('warmup-floor', 'STS-B', 'lora')}, ELoRA "
            f"{score('warmup-floor', 'STS-B', 'elora')} under the same arm). "
            + ("LoRA and ELoRA did not collapse under any arm. " if not any(r["collapsed"] for r in others) else
               "LoRA or ELoRA collapsed too: " + ", ".join(f"{r['arm']} {r['task']} {r['method']} {r['collapsed']} of "
                                                         f"{len(r['seeds'])}" for r in others if r["collapsed"]) + ". ")
            + "(The longer warm-up with v1's rate was not tried.) "
            f"On CoLA, AFLoRA {'trails' if trails else 'does not trail'} both LoRA and ELoRA under every head and "
            f"warm-up arm (released head: {score('released-head', 'CoLA', 'aflora')} vs LoRA "
            f"{score('released-head', 'CoLA', 'lora')} and ELoRA {score('released-head', 'CoLA', 'elora')} MCC), and "
            f"A, B frozen from step 0 scored {score('frozen-AB', 'CoLA', 'aflora')}, "
            f"{'no lower than' if frozen['mean'] >= adaptive['mean'] else 'below'} the adaptive phase's "
            f"{score('released-head', 'CoLA', 'aflora')} (a later freeze: {score('late-freeze', 'CoLA', 'aflora')}): "
            + ("on this model and budget the adaptive phase did not measurably help."
               if frozen["mean"] >= adaptive["mean"] - max(adaptive["sd"], frozen["sd"]) else
               "the adaptive phase helped by more than the seeds' spread."))


@functools.lru_cache(maxsize=None)
def one_class_scores(task: str, seed: int = 0) -> tuple:
    """The main metric of predicting the same class for every example of the held-out split, one value
    per class (CoLA: MCC 0; MRPC: F1 0 or the F1 of "always paraphrase"); () for STS-B. A run whose best
    held-out score is one of these learned nothing."""
    if helpers.TASKS[task]["num_labels"] == 1:
        return ()
    _, held_out = P._load_task(task, P.grid_settings(task, "cpu"), seed=seed, split="heldout")
    labels = [e["label"] for e in held_out]
    return tuple(helpers.compute_metrics(task, np.full(len(labels), c), labels)["metric"]
                 for c in range(helpers.TASKS[task]["num_labels"]))


def v2_search_table(records, one_class=None) -> str:
    """Protocol v2's search: per (method, task) the held-out score of each factor tried and the choice.
    With one_class (e.g. one_class_scores, which reads the GLUE labels), a score marked * is what predicting
    one class for every held-out example scores (a collapsed run)."""
    def score(r):
        same = one_class is not None and any(math.isclose(r["best"], s, abs_tol=1e-9)
                                             for s in one_class(r["task"], r["seed"]))
        return f"x{r['lr_factor']:.3g}: {r['best']:.4f}" + ("*" if same else "")
    lines = [f"{'method':8s} {'task':6s} {'factors tried: held-out score (best epoch)':60s} chosen"]
    for m in METHODS:
        for t in TASKS:
            rs = sorted((r for r in records if r["method"] == m and r["task"] == t), key=lambda r: r["lr_factor"])
            if not rs:
                continue
            chosen = G.v2_search(records, m, t)[1]
            tried = "  ".join(score(r) for r in rs)
            lines.append(f"{m:8s} {t:6s} {tried:60s} {'-' if chosen is None else f'x{chosen:.3g}'}")
    if any("*" in line for line in lines):
        lines.append("* every held-out example gets the same class: this is the score of predicting one class "
                     "(the run learned nothing)")
    return "\n".join(lines)


def v2_markdown() -> str:
    """The README's protocol-v2 block, from lr_search_cpu_v2.json and glue_cpu_v2.json only, with v1's
    means beside v2's."""
    search = read_records(G.results_file("v2", "lr_search"))
    grid = [r for r in read_records(G.results_file("v2", "grid")) if r.get("kind") == "grid"]
    v1 = [r for r in read_records(G.GLUE_CPU) if r.get("kind") == "grid"]
    n_pairs = len(TASKS) * len(METHODS)
    done = len(G.v2_choices(search))
    out = [f"Status: {len(search)} learning-rate search runs ({done} of {n_pairs} (method, task) searches finished, "
           f"{len(G.V2_FACTORS)} factors each, one more x3 beyond the edge while the best is at an edge, at most "
           f"{G.V2_MAX_WIDEN} more) and "
           f"{len(grid)} of {GRID_RUNS} grid runs are in "
           "[`lr_search_cpu_v2.json`](notebooks/results/lr_search_cpu_v2.json) and "
           "[`glue_cpu_v2.json`](notebooks/results/glue_cpu_v2.json)"
           + (" (unfinished: the same command resumes it)." if len(grid) < GRID_RUNS else ".")
           + f" CPU time{' so far' if len(grid) < GRID_RUNS else ''}: search {sum(_run_time(r) for r in search) / 3600:.1f} h, "
             f"grid {sum(_run_time(r) for r in grid) / 3600:.1f} h (one thread per run; two run at a time on this "
             f"2-core machine, so about {sum(_run_time(r) for r in search + grid) / 7200:.1f} h of the machine)."
           + ("" if len(grid) >= GRID_RUNS else f" A task is compared once every method has its {len(SEEDS)} seeds.")]
    if search:
        out += ["", "**Search** (held-out 10% of each training split, seed 0):", "", "```text",
                v2_search_table(search, one_class_scores), "```"]
    if not grid:
        return "\n".join(out) + "\n"
    out += ["", "**Accuracy, v2** (best dev epoch, mean ± sd over seeds (n); a lone seed has no sd), v1's mean "
            "beside it:", "",
            "| task | " + " | ".join(f"{METHOD_LABELS[m]} v2 | v1" for m in METHODS) + " |",
            "|---" * (2 * len(METHODS) + 1) + "|"]
    for t in TASKS:
        cells = []
        for m in METHODS:
            v = [r["best"] for r in grid if r["task"] == t and r["method"] == m]
            w = [r["best"] for r in v1 if r["task"] == t and r["method"] == m]
            cells += ["pending" if not v else f"{statistics.mean(v):.3f}"
                      + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "") + f" ({len(v)})",
                      f"{statistics.mean(w):.3f}" if w else "-"]
        out.append(f"| {t} ({helpers.TASKS[t]['metric']}) | " + " | ".join(cells) + " |")
    fair = complete_tasks(grid, seeds=SEEDS)
    if fair:
        g2, g1 = summarize_glue([r for r in grid if r["task"] in fair]), summarize_glue([r for r in v1 if r["task"] in fair])
        out.append(f"| mean over {', '.join(fair)} | " + " | ".join(
            f"{g2[m]['mean']:.3f} | {g1[m]['mean']:.3f}" for m in METHODS) + " |")
        def last(recs, m):                      # the last epoch's score: no epoch chosen on the dev set
            return statistics.mean(statistics.mean(r["last"] for r in recs if r["task"] == t and r["method"] == m)
                                   for t in fair)
        out.append("| mean of the last epoch | " + " | ".join(
            f"{last(grid, m):.3f} | {last(v1, m):.3f}" for m in METHODS) + " |")
        out.append("| time-averaged trainable params | " + " | ".join(
            f"{g2[m]['params']:,.0f} | {g1[m]['params']:,.0f}" for m in METHODS) + " |")

        def hours(recs, m, keys):                # CPU time of m's runs on the (task, seed) pairs in keys
            return sum(_run_time(r) for r in recs if r["method"] == m and (r["task"], r["seed"]) in keys) / 3600
        keys = {m: {(r["task"], r["seed"]) for r in grid if r["task"] in fair and r["method"] == m} for m in METHODS}
        out.append("| whole-run CPU time, h (v1: the same tasks and seeds) | " + " | ".join(
            f"{hours(grid, m, keys[m]):.2f} | {hours(v1, m, keys[m]):.2f}" for m in METHODS) + " |")
    rows = {r["target"]: r for r in targets([r for r in grid if r["task"] in fair], None, "glue_cpu_v2.json")}
    final = len(grid) >= GRID_RUNS

    def verdict(r):
        if r["status"] == "not measured yet":
            return "not measured yet."
        return ("holds" if r["status"] == "met" else "does not hold") + ("" if final else " so far") + f" ({r['value']})."
    out += ["", "**The paper's claims under protocol v2** (computed from `glue_cpu_v2.json`; the same targets as v1's):", "",
            "- AFLoRA matches or beats LoRA with >= 5x fewer time-averaged parameters: "
            + verdict(rows["AFLoRA mean >= LoRA mean, with >= 5x fewer time-averaged params"]),
            "- An AFLoRA run takes <= 0.6x of an ELoRA run: " + verdict(rows["AFLoRA whole-run time <= 0.6x ELoRA's"])]
    if fair:
        gaps = {t: statistics.mean(r["best"] for r in grid if r["task"] == t and r["method"] == "aflora")
                - statistics.mean(r["best"] for r in grid if r["task"] == t and r["method"] == "lora") for t in fair}
        out.append("- AFLoRA - LoRA per task: " + ", ".join(f"{t} {d:+.3f}" for t, d in gaps.items()) + ".")
        out += ["", v2_reading(grid, v1, final)]
    return "\n".join(out) + "\n"


def compare(records, task, a, b) -> dict:
    """a's mean - b's mean on task over their seeds, and Welch's t-test over the seeds (scipy): dict(gap,
    p, n_a, n_b); p is None with fewer than 2 seeds each or no spread at all."""
    from scipy.stats import ttest_ind
    x = [r["best"] for r in records if r["task"] == task and r["method"] == a]
    y = [r["best"] for r in records if r["task"] == task and r["method"] == b]
    p = None
    if len(x) > 1 and len(y) > 1 and (statistics.pstdev(x) > 0 or statistics.pstdev(y) > 0):
        p = float(ttest_ind(x, y, equal_var=False).pvalue)
    return dict(gap=statistics.mean(x) - statistics.mean(y), p=p, n_a=len(x), n_b=len(y))


def _per_task_words(records, tasks, other, alpha=0.05) -> str:
    """AFLoRA against `other` per task, in three groups: below, no resolvable difference, above."""
    groups = {"below": [], "no difference the seeds resolve": [], "above": []}
    for t in tasks:
        c = compare(records, t, "aflora", other)
        p = "p n/a" if c["p"] is None else "p < 0.001" if c["p"] < 0.001 else f"p {c['p']:.3f}"
        key = ("no difference the seeds resolve" if c["p"] is None or c["p"] >= alpha
               else "above" if c["gap"] > 0 else "below")
        groups[key].append(f"{t} ({c['gap']:+.3f}, {p})")
    return "; ".join(f"{k} on {', '.join(v)}" for k, v in groups.items() if v)


def robustness(grid, tasks) -> dict:
    """Checks of the mean's verdict against single runs (added after v2's results were seen; the rule
    written before the runs compares means): each task's median seed in place of its mean, the tasks on
    which AFLoRA's mean is below LoRA's, and the task that carries the verdict, if any: the one whose gap
    is largest, when the mean gap over the other tasks has the other sign. With a carrier, `outlier` is
    the run of LoRA or AFLoRA there farthest from its method's median (task, method, seed, score, the
    other seeds' scores)."""
    def median_mean(m):
        return statistics.mean(statistics.median(r["best"] for r in grid if r["task"] == t and r["method"] == m)
                               for t in tasks)
    gaps = {t: compare(grid, t, "aflora", "lora")["gap"] for t in tasks}
    total, carrier, outlier = statistics.mean(gaps.values()), None, None
    if len(tasks) > 1:
        t = max(gaps, key=lambda u: abs(gaps[u]))
        rest = statistics.mean(g for u, g in gaps.items() if u != t)
        if (rest >= 0) != (total >= 0):
            carrier = (t, gaps[t], rest)
            runs = [r for r in grid if r["task"] == t and r["method"] in ("lora", "aflora")]
            med = {m: statistics.median(r["best"] for r in runs if r["method"] == m) for m in ("lora", "aflora")}
            far = max(runs, key=lambda r: abs(r["best"] - med[r["method"]]))
            outlier = (t, far["method"], far["seed"], far["best"],
                       sorted(r["best"] for r in runs if r["method"] == far["method"] and r is not far))
    return dict(median_aflora=median_mean("aflora"), median_lora=median_mean("lora"),
                below=[t for t, g in gaps.items() if g < 0], n=len(tasks), carrier=carrier, outlier=outlier)


def robustness_words(grid, tasks) -> str:
    """`robustness` in words, for the README's and notebook 04's reading of v2."""
    if not tasks:
        return ""
    b = robustness(grid, tasks)
    d = b["median_aflora"] - b["median_lora"]
    out = (f"Checked after the results were seen (not part of the rule written before the runs): with each "
           f"task's median seed in place of its mean, AFLoRA scores {b['median_aflora']:.3f} against LoRA's "
           f"{b['median_lora']:.3f} ({d:+.3f}), so by the median the claim "
           f"{'holds' if d >= 0 else 'does not hold'}; AFLoRA's mean is below LoRA's on {len(b['below'])} of "
           f"{b['n']} tasks" + (f" ({', '.join(b['below'])})" if b["below"] else "") + ".")
    if b["carrier"]:
        t, gap, rest = b["carrier"]
        _, m, seed, score, others = b["outlier"]
        out += (f" The mean's verdict rests on {t} ({gap:+.3f}): over the other tasks the gap is {rest:+.3f}. "
                f"There {METHOD_LABELS[m]}'s seed {seed} scored {score:.3f} (its other seeds "
                + ", ".join(f"{x:.3f}" for x in others) + ").")
    return out


def robustness_short(grid, tasks) -> str:
    """`robustness` in one clause, for the README's status line and notebook 03's recap."""
    b = robustness(grid, tasks)
    out = (f"by each task's median seed AFLoRA {b['median_aflora']:.3f} vs LoRA {b['median_lora']:.3f}; AFLoRA's "
           f"mean below LoRA's on {len(b['below'])} of {b['n']} tasks")
    if b["carrier"]:
        t, m, seed, score, _ = b["outlier"]
        out += f"; the mean's verdict rests on {t}, where {METHOD_LABELS[m]}'s seed {seed} scored {score:.3f}"
    return out


def v2_reading(grid, v1, final: bool) -> str:
    """The plain verdict of protocol v2, every number and word from the records: the mean over the tasks
    every method has finished with all its seeds, the parameter ratio, per task AFLoRA against LoRA and ELoRA (Welch's
    t-test over seeds, p < 0.05), and how far each method moved from v1 on the same tasks."""
    fair = complete_tasks(grid, seeds=SEEDS)
    if not fair:
        return ""
    g2 = summarize_glue([r for r in grid if r["task"] in fair])
    g1 = summarize_glue([r for r in v1 if r["task"] in fair])
    lo, af, el = g2["lora"], g2["aflora"], g2["elora"]
    ratio = lo["params"] / af["params"]
    holds = af["mean"] >= lo["mean"] and ratio >= 5
    seeds = sorted({n for m in g2.values() for n in m["n"].values()})
    return (f"**Verdict{'' if final else ' so far'}** (protocol v2, {', '.join(fair)}; "
            f"{'/'.join(map(str, seeds))} seeds per task and method). AFLoRA's mean is {af['mean']:.3f} against LoRA's "
            f"{lo['mean']:.3f} ({af['mean'] - lo['mean']:+.3f}) with {ratio:.1f}x fewer time-averaged trainable "
            f"parameters: the paper's claim that it matches or beats LoRA {'holds' if holds else 'does not hold'} "
            f"here{'' if final else ' so far'}. Per task (AFLoRA - LoRA, Welch's t-test over the seeds, p < 0.05; "
            f"with 3 seeds only large gaps resolve), AFLoRA against LoRA: {_per_task_words(grid, fair, 'lora')}. "
            f"Against ELoRA (mean {el['mean']:.3f}, {el['params'] / af['params']:.1f}x AFLoRA's parameters): "
            f"{_per_task_words(grid, fair, 'elora')}. From v1 to v2 on these tasks the means moved: "
            + ", ".join(f"{METHOD_LABELS[m]} {g1[m]['mean']:.3f} -> {g2[m]['mean']:.3f}" for m in METHODS) + ". "
            + robustness_words(grid, fair))


def _collapse_line(rows) -> str:
    row = {(r["arm"], r["task"], r["method"]): r for r in rows}
    a, b = row[("v1-head", "STS-B", "aflora")], row[("warmup-floor", "STS-B", "aflora")]
    return (f"AFLoRA's held-out STS-B runs collapsed in {a['collapsed']} of {len(a['seeds'])} seeds under v1's recipe "
            f"(Pearson {a['mean']:.3f}) and in {b['collapsed']} of {len(b['seeds'])} with the released classifier rate "
            f"and a {b['warmup_steps']}-step warm-up ({b['mean']:.3f}); on CoLA it "
            + ("trailed LoRA and ELoRA under every head and warm-up arm" if _cola_trails(row) else
               "did not trail LoRA and ELoRA under every arm") + " (its reading is below the diagnosis table).")


def _cola_trails(row) -> bool:
    """Whether AFLoRA's held-out CoLA score is below both LoRA's and ELoRA's under each head and warm-up arm."""
    return all(row[(a, "CoLA", "aflora")]["mean"] < min(row[(a, "CoLA", m)]["mean"] for m in ("lora", "elora"))
               for a in ("v1-head", "released-head", "warmup-floor"))


def status_markdown() -> str:
    """The README's "where things stand": one line per study (v1, the diagnosis, v2), which verdict is
    the current one, from the result files only."""
    from bench import diagnosis as D
    v1 = [r for r in read_records(G.GLUE_CPU) if r.get("kind") == "grid"]
    diag = read_records(G.RESULTS_DIR / G.DIAGNOSIS_FILE)
    search = read_records(G.results_file("v2", "lr_search"))
    v2 = [r for r in read_records(G.results_file("v2", "grid")) if r.get("kind") == "grid"]
    acc = "AFLoRA mean >= LoRA mean, with >= 5x fewer time-averaged params"
    words = {"met": "holds", "missed": "does not hold", "not measured yet": "not measured yet"}

    def claim(recs, name):
        r = {x["target"]: x for x in targets(recs, None, name)}[acc]
        return f"AFLoRA matches LoRA with >= 5x fewer parameters: {words[r['status']]} ({r['value']})"
    n_diag, done_v2 = len(D.diagnosis_jobs()), len(v2) >= GRID_RUNS
    lines = [f"- **Protocol v1** ({len(v1)} of {GRID_RUNS} grid runs, `glue_cpu.json`): {claim(v1, 'glue_cpu.json')}."
             + ("" if done_v2 else " The current verdict until v2 is complete; its recipe is in question (next line)."),
             f"- **Diagnosis** ({len(diag)} of {n_diag} held-out runs, `diagnosis_cpu.json`): "
             + ("unfinished." if len(diag) < n_diag else _collapse_line(D.summary(diag)))]
    if done_v2:
        lines.append(f"- **Protocol v2** ({len(v2)} of {GRID_RUNS} grid runs, `glue_cpu_v2.json`): "
                     f"{claim(v2, 'glue_cpu_v2.json')}, by the mean, the rule written before the runs (checked "
                     f"after them: {robustness_short(v2, complete_tasks(v2, seeds=SEEDS))}). This is the current verdict "
                     "(v2's table, per-task tests and reading close this section); v1's stays as the record of the "
                     "first protocol.")
    else:
        lines.append(f"- **Protocol v2** (running: {len(G.v2_choices(search))} of {len(TASKS) * len(METHODS)} "
                     f"(method, task) learning-rate searches and {len(v2)} of {GRID_RUNS} grid runs done): its "
                     "block at the end of this section fills in as runs land; its verdict replaces v1's once all "
                     f"{GRID_RUNS} runs are in.")
    return "Where things stand (generated from the result files):\n\n" + "\n".join(lines) + "\n"


def readme_blocks() -> dict:
    """{marker name: text} of the README's generated blocks: between `<!-- NAME:begin ... -->` and
    `<!-- NAME:end -->` the README holds exactly this text (tests/test_readme.py checks it)."""
    return dict(status=status_markdown(), results=results_markdown(), diagnosis=diagnosis_markdown(),
                v2=v2_markdown())


def update_readme(path) -> list[str]:
    """Rewrite the generated blocks of the README at `path` in place; returns the names that changed."""
    from pathlib import Path
    path = Path(path)
    text, changed = path.read_text(encoding="utf-8"), []
    for name, block in readme_blocks().items():
        begin = text.index(f"<!-- {name}:begin")
        start, end = text.index("\n", begin) + 1, text.index(f"<!-- {name}:end -->")
        if text[start:end] != block:
            text, changed = text[:start] + block + text[end:], changed + [name]
    path.write_text(text, encoding="utf-8")
    return changed
