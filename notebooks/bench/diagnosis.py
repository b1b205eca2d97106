r"""The diagnosis: why did AFLoRA trail LoRA in the first CPU grid (protocol v1)? A study on held-out data.

Every run trains on the 90% part of a task's training split and is scored on the held-out 10% (the
same seeded split as the learning-rate search); no dev set is seen. The CPU protocol's epochs (CoLA 5,
STS-B 3), batch 32, length 128, the adapter rates at factor 1 (the released AFLoRA rates for ELoRA and
AFLoRA, 5e-4 for LoRA), seeds 0, 1, 2. Written down before any of its runs:

  arm             change from protocol v1 (all at factor 1)       tasks          methods
  v1-head         none but the factor: v1's head rule, 4e-3        STS-B, CoLA    LoRA, ELoRA, AFLoRA
                  (ELoRA, AFLoRA) or the adapter rate (LoRA), 6%
                  warm-up (v1's grid ran AFLoRA at x1/3)
  released-head   head = the released per-task ratio x adapter     STS-B, CoLA    LoRA, ELoRA, AFLoRA
                  rate (CoLA 4x, STS-B 1x), every method
  warmup-floor    released-head + warm-up of at least              STS-B, CoLA    LoRA, ELoRA, AFLoRA
                  WARMUP_FLOOR steps
  late-freeze     released-head + t_final 50% of T (adaptive       CoLA           AFLoRA
                  phase ends at 50% of T instead of 30%)
  frozen-AB       released-head, AFLoRA with every A and B         CoLA           AFLoRA
                  frozen from step 0 (ELoRA at r=4): the control
                  that says whether the adaptive phase helps

LoRA on STS-B has the same settings in v1-head and released-head (the released STS-B ratio is 1, and
v1's LoRA head already ran at its adapter rate): one run serves both arms (its record lists both).

WARMUP_FLOOR = 100 steps, chosen from the released runs' warm-up before any run of this study: 6% of
their steps at batch 64 is 47 (RTE), 70 (MRPC), 108 (STS-B), 161 (CoLA) and 632 (SST-2) steps; the
STS-B run, where the collapse was seen, warms up over about 100. Ours at 6% of the CPU protocol: STS-B
29 steps (held-out 90%), CoLA 72. The floor is capped at a quarter of a run (protocol.warmup_steps).

Measured in every run (make_probe, every PROBE_EVERY steps on a fixed batch of the first 64 held-out
examples, in eval mode, so the training itself is untouched): the spread of the pooled features across
examples (the classifier's input; the mean over features of the standard deviation over examples), and
every DW_EVERY steps the Frobenius norm of each feed-forward layer's ΔW; besides these the record holds
the training loss per 10 steps (loss_curve), the held-out metric per epoch (dev_history) and, for
AFLoRA, frozen_at. A run counts as collapsed when its final feature spread is below COLLAPSE_RATIO of
its spread at step 1 (fixed before the runs).

The probe leaves training alone: it draws nothing from torch's RNG and runs in eval mode. Until commit
"diagnosis probe: no RNG draw" it did draw once, when it built its batch before step 1 (a DataLoader
draws a seed when iterated): the 8 STS-B seed-0 runs (all arms) were trained with that one extra draw,
i.e. with other dropout masks than a run without the probe, the same for all their arms. Every other
run of the study has the masks of a plain run.

Timeline: the arms, the floor and the collapse rule were committed (68829d0) before the first run; the
v2 warm-up rule (warmup_choice) was committed after the first run (v1-head LoRA STS-B seed 0) had
finished and before any released-head or warmup-floor run had.
"""
from __future__ import annotations

import re
import statistics

import torch

from bench.protocol import METHOD_LABELS, METHODS, SEEDS, am, helpers

DIAG_TASKS = ("STS-B", "CoLA")
WARMUP_FLOOR = 100
PROBE_EVERY, DW_EVERY, PROBE_EXAMPLES = 10, 50, 64
COLLAPSE_RATIO = 0.1
ARMS = {
    "v1-head": dict(settings=dict(head_rule="v1"), tasks=DIAG_TASKS, methods=METHODS,
                    what="protocol v1: head 4e-3 (ELoRA, AFLoRA) or the adapter rate (LoRA), 6% warm-up"),
    "released-head": dict(settings=dict(head_rule="released"), tasks=DIAG_TASKS, methods=METHODS,
                          what="head = released ratio x adapter rate (CoLA 4x, STS-B 1x)"),
    "warmup-floor": dict(settings=dict(head_rule="released", warmup_floor=WARMUP_FLOOR), tasks=DIAG_TASKS,
                         methods=METHODS, what=f"released head + warm-up >= {WARMUP_FLOOR} steps"),
    "late-freeze": dict(settings=dict(head_rule="released", t_final_frac=0.50), tasks=("CoLA",),
                        methods=("aflora",), what="released head + t_final 50% of T"),
    "frozen-AB": dict(settings=dict(head_rule="released", aflora_adaptive=False), tasks=("CoLA",),
                      methods=("aflora",), what="released head, A and B frozen from step 0 (ELoRA r=4)"),
}
_FFN = re.compile(r"layer\.(\d+)\.(intermediate|output)\.dense$")


def _effective(arm: str, task: str, method: str) -> tuple:
    """What a run of an arm actually trains with (two arms with the same tuple share one run)."""
    from bench import protocol as P
    s = P.grid_settings(task, "cpu", **ARMS[arm]["settings"])
    return (P.learning_rates(method, task, 1.0, s["head_rule"]), s["warmup_floor"], s["t_final_frac"],
            s["aflora_adaptive"] if method == "aflora" else None)


def diagnosis_jobs(seeds=SEEDS) -> list[dict]:
    """The study's runs, seed by seed (a study cut short has whole seeds), STS-B first."""
    jobs = []
    for seed in seeds:
        for task in DIAG_TASKS:
            seen = {}
            for arm, a in ARMS.items():
                if task not in a["tasks"]:
                    continue
                for method in a["methods"]:
                    key = (method, _effective(arm, task, method))
                    if key in seen:                       # same settings as an earlier arm: one run
                        seen[key]["arms"].append(arm)
                        continue
                    job = dict(kind="diagnosis", task=task, method=method, seed=seed, lr_factor=1.0,
                               split="heldout", protocol="diagnosis", arm=arm, arms=[arm])
                    seen[key] = job
                    jobs.append(job)
    return jobs


def make_probe(every: int = PROBE_EVERY, dw_every: int = DW_EVERY, n_examples: int = PROBE_EXAMPLES):
    """A probe for protocol.train_one: (model, tokenizer, held-out examples) -> probe(step)."""
    def build(model, tokenizer, examples):
        with torch.random.fork_rng(devices=[]):      # iterating a DataLoader draws from torch's RNG
            batch = next(iter(helpers.make_loader(tokenizer, examples[:n_examples], n_examples, 128)))
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items() if k != "labels"}
        ffn = [(f"{m.group(2)}.{m.group(1)}", layer) for name, layer in am.adapter_layers(model)
               for m in [_FFN.search(name)] if m]
        head = model.classifier
        seen = {}

        def grab(module, args):
            seen["x"] = args[0].detach()

        def probe(step):
            if step != 1 and step % every:
                return None
            was = model.training
            handle = head.register_forward_pre_hook(grab)
            try:
                model.eval()
                with torch.no_grad():
                    model(**batch)
            finally:
                handle.remove()
                model.train(was)
            out = dict(feature_spread=round(float(seen.pop("x").float().std(dim=0).mean()), 6))
            if step == 1 or step % dw_every == 0:
                with torch.no_grad():
                    out["dw_norm"] = {k: round(float(layer.delta_weight().norm()), 5) for k, layer in ffn}
            return out
        return probe
    return build


# ------------------------------------------------------------------------------------------------
# Reading the study


def arm_records(records, arm: str) -> list[dict]:
    """The runs that serve an arm (a shared run counts in each arm it serves)."""
    return [r for r in records if arm in r.get("arms", [r.get("arm")])]


def collapsed(r: dict) -> bool:
    """Whether a run's pooled features collapsed: final spread < COLLAPSE_RATIO x its spread at step 1."""
    p = r["probe"]
    return p[-1]["feature_spread"] < COLLAPSE_RATIO * p[0]["feature_spread"]


def summary(records) -> list[dict]:
    """One row per (arm, task, method) with runs: the held-out metric (best epoch) mean and sd over seeds,
    the seeds, how many runs collapsed, the final feature spread (mean), the largest FFN ΔW norm at the
    end (mean over seeds) and, for AFLoRA, the step by which every A and B was frozen (mean)."""
    rows = []
    for arm in ARMS:
        rs_arm = arm_records(records, arm)
        for task in DIAG_TASKS:
            for method in METHODS:
                rs = sorted((r for r in rs_arm if r["task"] == task and r["method"] == method),
                            key=lambda r: r["seed"])
                if not rs:
                    continue
                best = [r["best"] for r in rs]
                frozen = [max(r["frozen_at"].values()) for r in rs if r.get("frozen_at")
                          and None not in r["frozen_at"].values()]
                dw = [max(next(p["dw_norm"] for p in r["probe"][::-1] if "dw_norm" in p).values()) for r in rs]
                rows.append(dict(arm=arm, task=task, method=method, seeds=[r["seed"] for r in rs],
                                 metric=rs[0]["metric"], best=best, mean=statistics.mean(best),
                                 sd=statistics.stdev(best) if len(best) > 1 else 0.0,
                                 collapsed=sum(collapsed(r) for r in rs),
                                 spread=statistics.mean(r["probe"][-1]["feature_spread"] for r in rs),
                                 dw_max=statistics.mean(dw), head_lr=rs[0]["head_lr"], lr=rs[0]["lr"],
                                 warmup_steps=rs[0]["warmup_steps"], steps=rs[0]["steps"],
                                 all_frozen_at=statistics.mean(frozen) if frozen else None))
    return rows


def warmup_choice(records) -> tuple[int, str]:
    """Protocol v2's warm-up rule, decided by this rule written before the study ran: (floor, why).
    Over the 6 (task, method) cells, the mean of (warmup-floor's mean held-out score - released-head's);
    v2 takes the floor WARMUP_FLOOR if that is >= 0, else the plain 6%. Raises while either arm has runs
    missing."""
    rows = {(r["arm"], r["task"], r["method"]): r for r in summary(records)}
    cells = [(t, m) for t in DIAG_TASKS for m in METHODS]
    missing = [(a, t, m) for a in ("released-head", "warmup-floor") for t, m in cells
               if len(rows.get((a, t, m), {}).get("seeds", [])) < len(SEEDS)]
    if missing:
        raise RuntimeError(f"protocol v2's warm-up rule comes from the diagnosis, which has {len(missing)} of "
                           f"{2 * len(cells)} (arm, task, method) cells unfinished; run `python "
                           "notebooks/benchmark.py diagnosis` first")
    diff = statistics.mean(rows[("warmup-floor", t, m)]["mean"] - rows[("released-head", t, m)]["mean"]
                           for t, m in cells)
    floor = WARMUP_FLOOR if diff >= 0 else 0
    return floor, (f"warm-up floor {WARMUP_FLOOR} steps vs 6% alone, with the released head: mean held-out "
                   f"difference {diff:+.4f} over {len(cells)} (task, method) cells -> "
                   + (f"v2 warms up over max(6% of T, {WARMUP_FLOOR} steps)" if floor else "v2 keeps 6% of T"))


def table(records) -> str:
    """The study as text: one line per (arm, task, method)."""
    lines = [f"{'arm':14s} {'task':6s} {'method':13s} {'lr':>8s} {'head':>8s} {'warm-up':>7s} "
             f"{'held-out (best epoch)':>23s} {'collapsed':>9s} {'spread':>7s} {'max |dW|':>8s} {'A,B frozen by':>13s}"]
    for r in summary(records):
        frozen = "-" if r["all_frozen_at"] is None else f"{r['all_frozen_at']:.0f}/{r['steps']}"
        lines.append(f"{r['arm']:14s} {r['task']:6s} {METHOD_LABELS[r['method']]:13s} {r['lr']:8.1e} "
                     f"{r['head_lr']:8.1e} {r['warmup_steps']:7d} "
                     f"{r['metric']:>7s} " + (f"{r['mean']:.3f} ± {r['sd']:.3f} ({len(r['seeds'])})" if len(r["seeds"]) > 1
                                              else f"{r['mean']:.3f}         (1)") + " "
                     f"{r['collapsed']:>5d}/{len(r['seeds'])} {r['spread']:7.3f} {r['dw_max']:8.2f} {frozen:>13s}")
    return "\n".join(lines)
