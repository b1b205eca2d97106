"""The exercise checks of notebooks/02_elora.ipynb and 02b_elora_paths.ipynb (notebooks/exercises.py,
section 02): each accepts the right answer (and its equivalent forms), treats the placeholder `...` as
not answered, and rejects the plausible wrong answers with an AssertionError whose hint names the
mistake. Also: the notebook-02 helpers of notebooks/helpers.py (step timing, the labelled training
log) and the structure of the two notebooks (check cells display nothing, the experiment of exercise 5
runs only after a right answer, cell tags instead of NBVAL comments, links). No pretrained model is
needed: the layer shapes are MiniLM-L6's, the timed model is a tiny random BERT."""
import ast
import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import aflora_min as am
import exercises as ex
import helpers as H

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

SHAPES = ([(384, 384)] * 4 + [(384, 1536), (1536, 384)]) * 6   # MiniLM-L6's six adapted linears x 6
FFN_IN = [(384, 1536)] * 6               # exercise 1's target set: intermediate.dense only (asymmetric)
EX1_RIGHT = 6 * (256 + 1536)             # 10,752
ELORA_1024 = 57_600
R_STAR_8192 = 8192 * 384 * 1536 / (2 * 8192 * 1920 - 3 * 384 * 1536)    # exercise 4: 162.75
N_STAR = 3 * 1536 * 1024 * 384 / (2 * 1024 * 1920 - 384 * 1536)        # exercise 5: 542.1
NAME = "bert.encoder.layer.3.intermediate.dense"


def small_layer(run_seed=0, name=NAME):
    """An ELoRA layer built as add_adapters builds `name` (small, so the test is fast)."""
    return am.ELoRALinear(torch.nn.Linear(16, 24), r=32, seed=am.layer_seed(run_seed, name))


def test_shapes_give_the_known_counts():
    assert sum(1024 + o for _, o in SHAPES) == ELORA_1024
    assert 8 * sum(i + o for i, o in SHAPES) == 331_776


def test_placeholder_is_not_an_error(capsys):
    assert ex.ex02_1(..., SHAPES, 256) is False
    assert ex.ex02_2(..., ELORA_1024, SHAPES) is False
    assert ex.ex02_3(..., small_layer(), 0, NAME) is False
    assert ex.ex02_4(..., 4096, 384, 1536) is False
    assert ex.ex02_5(..., 384, 1536, 1024) is False
    assert capsys.readouterr().out.count("not answered yet") == 5


def test_right_answers(capsys):
    assert ex.ex02_1(29_952, SHAPES, 256, built=29_952) is True
    assert ex.ex02_1(np.int64(29_952), SHAPES, 256) is True
    assert ex.ex02_1(EX1_RIGHT, FFN_IN, 256, built=EX1_RIGHT, all_shapes=SHAPES) is True
    assert ex.ex02_1(float(EX1_RIGHT), FFN_IN, 256) is True
    assert ex.ex02_2(ELORA_1024 / 41_472, ELORA_1024, SHAPES) is True
    assert ex.ex02_2(1.39, ELORA_1024, SHAPES) is True
    assert ex.ex02_2(1.4, ELORA_1024, SHAPES) is True
    assert ex.ex02_3(am.layer_seed(0, NAME), small_layer(), 0, NAME) is True
    assert ex.ex02_3(am.layer_seed(5, NAME), small_layer(5), 5, NAME) is True
    assert ex.ex02_4(4096 * 384 * 1536 / (2 * 4096 * 1920 - 3 * 384 * 1536), 4096, 384, 1536) is True
    assert ex.ex02_4(173, 4096, 384, 1536) is True
    assert ex.ex02_5(N_STAR, 384, 1536, 1024) is True
    assert ex.ex02_5(542.1, 384, 1536, 1024) is True
    assert capsys.readouterr().out.count("\u2713") == 13


@pytest.mark.parametrize("wrong", [
    ELORA_1024,                                  # the r = 1024 count: rank not changed
    sum(256 * (i + o) for i, o in SHAPES),       # LoRA's formula
    36 * 256,                                    # d only
    sum(o for _, o in SHAPES),                   # b only
    256 + 384, 256 + 1536,                       # one layer
    29_951, 30_000,
    "29952", None, True,
])
def test_ex1_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex02_1(wrong, SHAPES, 256)


def test_ex1_rejects_inconsistent_build():
    with pytest.raises(AssertionError):
        ex.ex02_1(29_952, SHAPES, 256, built=ELORA_1024)


@pytest.mark.parametrize("wrong", [
    1, 2,                                        # whole ranks on either side
    41_472 / ELORA_1024,                         # inverted
    331_776 / ELORA_1024,                        # "5.8x fewer": a ratio, not a rank
    1024,                                        # same rank
    1.3, 1.5, "1.39", None,
])
def test_ex2_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex02_2(wrong, ELORA_1024, SHAPES)


@pytest.mark.parametrize("wrong", [
    0,                                           # one shared seed: the run seed
    3,                                           # run seed + layer index
    am.layer_seed(1, NAME),                      # another run's seed
    am.layer_seed(0, "bert.encoder.layer.3.output.dense"),   # another layer's seed
    am.layer_seed(0, "intermediate.dense"),      # not the full dotted name
    "0", None, 1.0,
    -1, 2 ** 64,                                 # no layer seed: outside [0, 2**63)
])
def test_ex3_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex02_3(wrong, small_layer(), 0, NAME)


@pytest.mark.parametrize("wrong", [
    384 * 1536 / (2 * 1920),                     # the many-token limit, 153.6
    96,                                          # the square layer's limit
    4096 * 384 * 384 / (2 * 4096 * 768 - 3 * 384 * 384),   # the square layer at n = 4096
    3 * 4096 * 384 * 1536 / (2 * 4096 * 1920 - 3 * 384 * 1536),   # unfused (c = 3)
    4096 * 384 * 1536 / (4096 * 1920 - 3 * 384 * 1536),           # token path without its backward
    1024, 0, "173", None,
])
def test_ex4_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex02_4(wrong, 4096, 384, 1536)


# ---------------------------------------------------------------- exercise 1: an asymmetric target set
@pytest.mark.parametrize("wrong, hint", [
    (6 * (256 + 384), "sizes b by d_in"),                  # b sized d_in: on MiniLM's full target set this sums the same
    (6 * (384 + 1536), "sizes d by d_in"),             # d sized d_in
    (6 * 256 * (384 + 1536), "LoRA"),            # LoRA's formula
    (6 * 256, "d only"),
    (6 * 1536, "b only"),
    (6 * (1024 + 1536), "r = 1024"),             # rank not changed
    (29_952, "all 36 layers"),                   # the whole target list of the notebook
    (256 + 1536, "one layer"),
    (10_751, "not quite"), (11_000, "not quite"),
])
def test_ex1_asymmetric_rejects_with_the_right_hint(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ex.ex02_1(wrong, FFN_IN, 256, all_shapes=SHAPES)


def test_ex1_d_in_mistake_shows_only_on_an_asymmetric_set():
    """Why exercise 1 asks about intermediate.dense alone: on the full target set, b sized d_in gives the
    right count (MiniLM's d_in and d_out sum the same), so no check could catch it there."""
    assert sum(256 + i for i, _ in SHAPES) == 29_952 == sum(256 + o for _, o in SHAPES)
    assert ex.ex02_1(sum(256 + i for i, _ in SHAPES), SHAPES, 256) is True
    assert sum(256 + i for i, _ in FFN_IN) != EX1_RIGHT


def _cells(name):
    return json.loads((NOTEBOOKS / name).read_text())["cells"]


def _src(cell):
    return "".join(cell["source"])


def test_notebook_ex1_uses_an_asymmetric_target_set():
    """The check cell of exercise 1 builds its model on a target set whose d_in and d_out counts differ,
    and passes that model's shapes to the check."""
    cell = next(_src(c) for c in _cells("02_elora.ipynb") if "ex02_1(" in _src(c))
    targets = ast.literal_eval(re.search(r'add_adapters\([^,]+, "elora", (\[[^\]]*\])', cell).group(1))
    minilm = {"query": (384, 384), "key": (384, 384), "value": (384, 384), "attention.output.dense": (384, 384),
              "intermediate.dense": (384, 1536), "output.dense": (1536, 384)}
    shapes = [minilm[t] for t in targets] * 6
    assert sum(i for i, _ in shapes) != sum(o for _, o in shapes)
    assert "ex1_shapes" in cell.split("ex02_1(")[1]
    with pytest.raises(AssertionError, match="sizes b by d_in"):
        ex.ex02_1(sum(256 + i for i, _ in shapes), shapes, 256)


# ---------------------------------------------------------------- exercise 4: 162 and 163 are right too
@pytest.mark.parametrize("right", [R_STAR_8192, 162.75, 162.5, 163.2, 162, 163, np.float64(162.75)])
def test_ex4_accepts_the_crossing_and_the_whole_ranks_beside_it(right, capsys):
    assert ex.ex02_4(right, 8192, 384, 1536) is True


@pytest.mark.parametrize("wrong, hint", [
    (160, "rounded"), (200, "rounded"), (161, "solve for r"), (164, "solve for r"), (159.58, "solve for r"),
    (153.6, "limit for very many tokens"),
    (8192 * 384 * 384 / (2 * 8192 * 768 - 3 * 384 * 384), "square"),
    (96, "square"),
    (3 * R_STAR_8192, "unfused"),
    (8192 * 384 * 1536 / (8192 * 1920 - 3 * 384 * 1536), "A x and B h forward"),
    (542.1, "solve for r"), (1024, "solve for r"),
])
def test_ex4_rejects_at_n_8192(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ex.ex02_4(wrong, 8192, 384, 1536)


def test_ex4_text_asks_for_what_the_check_accepts():
    """02b's exercise 4: no GPU step times the reader never sees; the whole ranks are named as right."""
    text = next(_src(c) for c in _cells("02b_elora_paths.ipynb") if "### Exercise 4" in _src(c))
    assert "GPU" not in text and "8192" in text and "either side" in text


# ---------------------------------------------------------------- exercise 5: a number, checked with tolerance
@pytest.mark.parametrize("right", [N_STAR, 542.1, 542, 543, 541.7, np.float32(542.12)])
def test_ex5_accepts(right, capsys):
    assert ex.ex02_5(right, 384, 1536, 1024) is True


@pytest.mark.parametrize("wrong, hint", [
    ("token", "plain number"), ("weight", "plain number"), (None, "plain number"), (True, "plain number"),
    (540, "rounded"), (500, "rounded"), (541, "solve for n"), (544, "solve for n"),
    (3 * 384 * 1024 * 384 / (2 * 1024 * 768 - 384 * 384), "square"),          # the 384 x 384 layer: 317.8
    (3 * 384 * 1536 / (2 * 1920), "per-token term"),                           # n d_in d_out left out: 460.8
    (1536 * 1024 * 384 / (2 * 1024 * 1920 - 384 * 1536), "two factors' gradients"),        # ΔW formed once: 180.7
    (3 * 1536 * 1024 * 384 / (1024 * 1920 - 384 * 1536), "A x and B h forward"),            # no backward: 1316.6
    (3 * 1536 * 1024 * 384 / (2 * 1024 * 1920 - 3 * 384 * 1536), "unfused"),   # c = 3: 837.8
    (1024, "that is a rank"), (153.6, "that is a rank"), (96, "that is a rank"),
    (2048, "solve for n"), (12, "solve for n"),
])
def test_ex5_rejects_with_the_right_hint(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ex.ex02_5(wrong, 384, 1536, 1024)


def test_ex4_ex5_rounded_only_for_a_rounding_of_the_truth():
    """Within 2% of the truth is not enough for "rounded": 161, 164, 159.58 (r* = 162.75) and 541, 544
    (n* = 542.1) are no rounding of it; 160 and 540 (two significant figures) are."""
    for wrong in (161, 164, 159.58):
        with pytest.raises(AssertionError, match="solve for r") as err:
            ex.ex02_4(wrong, 8192, 384, 1536)
        assert "rounded" not in str(err.value)
    for wrong in (541, 544):
        with pytest.raises(AssertionError, match="solve for n") as err:
            ex.ex02_5(wrong, 384, 1536, 1024)
        assert "rounded" not in str(err.value)
    with pytest.raises(AssertionError, match="rounded too far"):
        ex.ex02_4(160, 8192, 384, 1536)
    with pytest.raises(AssertionError, match="rounded too far"):
        ex.ex02_5(540, 384, 1536, 1024)


def test_ex4_unfused_hint_names_the_weight_gradient_g_xT():
    with pytest.raises(AssertionError, match="only its gradient g xᵀ \\(n in out\\) is extra") as err:
        ex.ex02_4(3 * R_STAR_8192, 8192, 384, 1536)
    assert "gyᵀ" not in str(err.value)


def test_ex1_ex2_classifier_head_counted():
    with pytest.raises(AssertionError, match="the classifier head is trained too, but it is not part of the count"):
        ex.ex02_1(EX1_RIGHT + 770, FFN_IN, 256, all_shapes=SHAPES)          # 11,522
    with pytest.raises(AssertionError, match="the classifier head is not part of the count"):
        ex.ex02_2((ELORA_1024 + 770) / 41_472, ELORA_1024, SHAPES)          # 1.4075
    with pytest.raises(AssertionError, match="the classifier head is not part of the count"):
        ex.ex02_2(1.407, ELORA_1024, SHAPES)


def test_ex5_other_shapes_and_ranks():
    square = 3 * 384 * 512 * 384 / (2 * 512 * 768 - 384 * 384)
    assert ex.ex02_5(square, 384, 384, 512) is True
    with pytest.raises(AssertionError, match="token path is cheaper for any number of tokens"):
        ex.ex02_5(100, 384, 1536, 64)               # 2 r (in + out) <= in out: no crossover at all


def test_ex5_refuses_a_library_that_disagrees(monkeypatch):
    monkeypatch.setattr(am.ELoRALinear, "choose_path", lambda self, x: "weight")
    with pytest.raises(AssertionError, match="library disagrees"):
        ex.ex02_5(N_STAR, 384, 1536, 1024)


# ---------------------------------------------------------------- the notebooks' structure
NB02 = ("02_elora.ipynb", "02b_elora_paths.ipynb")


@pytest.mark.parametrize("name", NB02)
def test_check_cells_display_nothing(name):
    """A check returns False while unanswered; a check call left as the cell's last expression would
    display that False under the cell. Each check cell ends with `;` or assigns the result."""
    checks = [_src(c) for c in _cells(name) if c["cell_type"] == "code" and "exercises.ex02_" in _src(c)]
    assert checks
    for cell in checks:
        last = ast.parse(cell).body[-1]
        displayed = isinstance(last, ast.Expr) and not isinstance(last.value, ast.Constant)
        assert not displayed or cell.rstrip().split("#")[0].rstrip().endswith(";"), cell


@pytest.mark.parametrize("name", NB02 + ("solutions/02_elora_solutions.ipynb",))
def test_cell_tags_instead_of_nbval_comments(name):
    cells = _cells(name)
    assert not any("NBVAL_IGNORE_OUTPUT" in _src(c) for c in cells)
    timed = [c for c in cells if c["cell_type"] == "code" and
             re.search(r"plt\.show\(\)|time_interleaved\(|time_layer_paths\(|helpers\.train\(|helpers\.setup\(", _src(c))]
    assert timed
    for c in timed:
        assert "nbval-ignore-output" in c["metadata"].get("tags", []), _src(c)[:80]


def _ex5_experiment_cell():
    cells = _cells("02b_elora_paths.ipynb")
    check = next(i for i, c in enumerate(cells) if "exercises.ex02_5(" in _src(c))
    assert re.match(r"ex5_done = exercises\.ex02_5\(", _src(cells[check]))
    experiment = next(i for i, c in enumerate(cells) if "time_layer_paths(" in _src(c))
    assert experiment > check
    return _src(cells[experiment])


def test_ex5_experiment_waits_for_a_right_answer(monkeypatch, capsys):
    """The cell that times the two paths (and would give exercise 5 away) measures nothing until the
    check has returned True, and measures once it has."""
    calls = []
    fake = lambda layer, ns, rounds, seed=0: calls.append(ns) or {(n, p): [1.0 + (p == "weight")]
                                                                   for n in ns for p in ("token", "weight")}
    monkeypatch.setattr(H, "time_layer_paths", fake)
    env = dict(helpers=H, am=am, torch=torch, np=np, RANK=1024, SEED=0, ROUNDS=1, device=torch.device("cpu"))
    exec(_ex5_experiment_cell(), dict(env, ex5_done=False))
    assert calls == [] and "not run yet" in capsys.readouterr().out
    exec(_ex5_experiment_cell(), dict(env, ex5_done=True))
    out = capsys.readouterr().out
    assert len(calls) == 1 and "token path is faster" in out and "not run yet" not in out


def test_links_and_no_stale_times():
    first02, first02b = (_src(_cells(n)[0]) for n in NB02)
    for text in (first02, first02b):
        assert "](solutions/02_elora_solutions.ipynb)" in text
    recap02 = _src([c for c in _cells(NB02[0]) if c["cell_type"] == "markdown"][-1])   # the last cell prints the time
    assert "](02b_elora_paths.ipynb)" in first02 and "](02b_elora_paths.ipynb)" in recap02
    for target in re.findall(r"\]\(([^)#]+\.ipynb)\)", first02 + first02b + recap02):
        assert (NOTEBOOKS / target).is_file(), target
    for name in NB02:
        for c in _cells(name):
            text = _src(c)
            if c["cell_type"] == "code":
                assert not re.search(r"\d+ minutes", text), text[:80]      # times belong in the table at the top
            elif re.search(r"released (AFLoRA )?code", text):
                assert "https://github.com/zeyuliu1037/AFLoRA" in text, text[:80]


# ---------------------------------------------------------------- the notebook-02 helpers
@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    batch = dict(input_ids=torch.randint(0, 40, (3, 8)), attention_mask=torch.ones(3, 8, dtype=torch.long),
                 labels=torch.tensor([0, 1, 0]))
    return model, batch


def test_timing_model_floor_runs_backward_through_the_blocks(tiny_bert):
    base, batch = tiny_bert
    floor = H.timing_model(base, blocks=1)
    assert len(floor.bert.encoder.layer) == 1 and len(base.bert.encoder.layer) == 2 and floor.training
    assert {n for n, p in floor.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    seen = []
    floor.bert.encoder.layer[0].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    floor(**batch).loss.backward()
    assert seen and seen[0].requires_grad        # the embedding hook: the block's backward runs too


def test_timing_model_adapters_paths_and_interleaving(tiny_bert):
    base, batch = tiny_bert
    elora = H.timing_model(base, "elora", 32, ["query", "value", "intermediate.dense"], blocks=1, path="token")
    layers = [l for _, l in am.adapter_layers(elora)]
    assert len(layers) == 3 and {l.path for l in layers} == {"token"}
    assert not any(isinstance(m, am.ELoRALinear) for m in base.modules())
    floor = H.timing_model(base, blocks=1)
    times = H.time_interleaved({"floor": (floor, None), "elora": (elora, "weight")}, batch, rounds=3)
    assert set(times) == {"floor", "elora"} and all(len(t) == 3 and min(t) > 0 for t in times.values())
    assert {l.path for l in layers} == {"weight"}
    assert all(p.grad is None for p in elora.parameters())


def test_time_layer_paths_restores_the_layer():
    layer = am.ELoRALinear(torch.nn.Linear(8, 12), r=16, seed=1)
    times = H.time_layer_paths(layer, (3, 5), rounds=2)
    assert set(times) == {(3, "token"), (3, "weight"), (5, "token"), (5, "weight")}
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    assert layer.path == "auto" and layer.lora_d.grad is None and layer.lora_b.grad is None


def test_device_name():
    assert "thread" in H.device_name("cpu")


def test_labelled_log_names_both_losses_of_train(tiny_bert):
    """Notebook 02's training log: every loss that helpers.train prints carries its label."""
    base, batch = tiny_bert
    model = am.add_adapters(copy.deepcopy(base), "elora", ["query", "value"], r=8)
    data = [{k: v[i] for k, v in batch.items()} for i in range(3)] * 4
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    lines = []
    H.train(model, loader, loader, "SST-2", epochs=1, lr=1e-2, log_every=2,
            log=H.labelled_log(2, log=lines.append))
    step_lines = [l for l in lines if l.lstrip().startswith("step ")]
    epoch_lines = [l for l in lines if l.startswith("epoch ")]
    assert len(step_lines) == 3 and len(epoch_lines) == 1
    assert all("loss (mean of the last 2 steps) " in l for l in step_lines)
    assert "loss (mean over the epoch) " in epoch_lines[0]
    assert all(re.search(r"loss \(", l) for l in lines if " loss " in l)
