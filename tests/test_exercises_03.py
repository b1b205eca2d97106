"""The exercise checks of notebooks/03_aflora.ipynb (notebooks/exercises.py, section 03): each accepts
the right answer, treats the placeholder `...` as not answered, and rejects the plausible wrong
answers with an AssertionError. No pretrained model is needed: small torch models stand in (for
Ex 2 one with MiniLM-L6's layer shapes), and freezers are driven with random gradients."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import aflora_min as am
import exercises as ex

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def toy(n_layers=1):
    """A stack of n_layers non-square linears with AFLoRA adapters: 2 adaptive matrices per layer."""
    dims = [8 if i % 2 == 0 else 16 for i in range(n_layers + 1)]
    seq = nn.Sequential(*[nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])
    return am.add_adapters(seq, "aflora", [str(i) for i in range(len(seq))], r=4, train=())


def drive(freezer, seed=0):
    """Run a freezer through all its steps on random gradients (new tensors every step)."""
    g = torch.Generator().manual_seed(seed)
    for t in range(freezer.total_steps):
        for n in freezer.active():
            p = freezer.params[n]
            p.grad = torch.rand(p.shape, generator=g) * (1 + t)
        freezer.step()
        for p in freezer.params.values():
            p.grad = None
    freezer.remove()
    return freezer


class _Node(nn.Module):
    pass


def minilm_shaped():
    """Six blocks with MiniLM-L6's six adapted linears, named as in BERT (no weights loaded)."""
    model = _Node()
    model.layer = nn.ModuleList()
    for _ in range(6):
        block = _Node()
        block.attention = _Node()
        block.attention.self = _Node()
        for name in ("query", "key", "value"):
            setattr(block.attention.self, name, nn.Linear(384, 384))
        block.attention.output = _Node()
        block.attention.output.dense = nn.Linear(384, 384)
        block.intermediate = _Node()
        block.intermediate.dense = nn.Linear(384, 1536)
        block.output = _Node()
        block.output.dense = nn.Linear(1536, 384)
        model.layer.append(block)
    return model


# ------------------------------------------------------------------ Ex 1: the time average
HISTORY = [(0, 100), (4, 60), (7, 20)]                     # counts hold from their step on
PER_STEP = [(t, 100 if t < 4 else 60 if t < 7 else 20) for t in range(1, 11)]
TRUTH_1 = np.mean([c for _, c in PER_STEP])                # 56.0


def test_placeholder_is_not_an_error(capsys):
    fz = am.AFLoRAFreezer(toy(), total_steps=30, t_init=15, t_final=3, window=5)
    assert ex.ex03_1(..., HISTORY, PER_STEP) is False
    assert ex.ex03_2(..., am.add_adapters(minilm_shaped(), "aflora", TARGETS, r=4, adaptive=True, train=())) is False
    assert ex.ex03_3(..., fz) is False
    assert ex.ex03_4(..., fz) is False                     # not answered: nothing else is looked at
    assert capsys.readouterr().out.count("not answered yet") == 4


def test_ex1_right(capsys):
    assert TRUTH_1 == 56.0
    assert ex.ex03_1(56, HISTORY, PER_STEP) is True
    assert ex.ex03_1(np.float64(56.0), HISTORY, PER_STEP) is True
    assert capsys.readouterr().out.count("\u2713") == 2


@pytest.mark.parametrize("wrong", [
    64.0,                  # a matrix frozen at step s counted as trainable at step s (the old convention)
    60.0,                  # plain mean of the history entries
    100, 20,               # start, end
    560 / 9, 560 / 11,     # divided by T - 1, T + 1
    57, 50, "56", None, True, (56,),
])
def test_ex1_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex03_1(wrong, HISTORY, PER_STEP)


def test_ex1_refuses_inputs_of_two_runs():
    with pytest.raises(RuntimeError):
        ex.ex03_1(56, [(0, 100), (5, 60), (7, 20)], PER_STEP)


def test_ex1_on_a_driven_freezer():
    fz = drive(am.AFLoRAFreezer(toy(6), total_steps=40, t_init=4, t_final=12, window=5))
    counts, n = [], fz.history[0][1]
    changes = dict(fz.history)
    for t in range(1, 41):                                 # what helpers.train records after each step
        n = changes.get(t, n)
        counts.append((t, n))
    assert ex.ex03_1(fz.time_averaged_trainable(), fz.history, counts) is True


# ------------------------------------------------------------------ Ex 2: adaptive=True everywhere
@pytest.fixture(scope="module")
def model_all():
    return am.add_adapters(minilm_shaped(), "aflora", TARGETS, r=4, adaptive=True, train=())


def test_ex2_right(model_all, capsys):
    assert ex.ex03_2((186_768, 20_880), model_all) is True
    assert ex.ex03_2([np.int64(186_768), 20_880.0], model_all) is True
    assert capsys.readouterr().out.count("\u2713") == 2


@pytest.mark.parametrize("wrong", [
    (113_040, 20_880),             # the default policy (only the FFN matrices adaptive)
    (20_880, 186_768),             # swapped
    (186_768 + 770, 20_880),       # classifier head included
    (186_768, 0),                  # d and b forgotten once frozen
    (186_768 - 20_880, 20_880),    # d and b forgotten at the start
    (186_768, 20_880 + 770),
    (186_768, 4 * 36),             # only d
    186_768, (186_768,), ("186768", "20880"), (186_768.5, 20_880),
])
def test_ex2_rejects(model_all, wrong):
    with pytest.raises(AssertionError):
        ex.ex03_2(wrong, model_all)


def test_ex2_refuses_the_default_policy():
    with pytest.raises(RuntimeError):
        ex.ex03_2((186_768, 20_880), am.add_adapters(minilm_shaped(), "aflora", TARGETS, r=4, train=()))


# ------------------------------------------------------------------ Ex 3: when can a matrix freeze
@pytest.fixture
def fz3():
    fz = am.AFLoRAFreezer(toy(), total_steps=30, t_init=15, t_final=3, window=5)
    yield fz
    fz.remove()


def test_ex3_right(fz3, capsys):
    assert ex.ex03_3({20, 25, 27}, fz3) is True
    assert ex.ex03_3([27, 25, 20], fz3) is True
    assert ex.ex03_3(np.array([20, 25, 27]), fz3) is True
    assert capsys.readouterr().out.count("\u2713") == 3


@pytest.mark.parametrize("wrong", [
    set(range(16, 28)),            # the old answer "steps 16..27": decisions come only every 5 steps
    set(range(16, 31)),
    {20, 25},                      # the forced freeze at T - t_f = 27 left out
    {15, 20, 25, 27},              # t = t_i is still warm-up
    {20, 25, 30},                  # the window grid to the end
    {20, 25, 27, 30},
    {5, 10, 15, 20, 25, 30},       # every multiple of the window
    {25, 27}, {27}, set(),
    "20, 25, 27", 27, {20, 25, 27.5}, {20: 1, 25: 1, 27: 1},
])
def test_ex3_rejects(fz3, wrong):
    with pytest.raises(AssertionError):
        ex.ex03_3(wrong, fz3)


def test_ex3_forced_step_on_the_grid():
    fz = am.AFLoRAFreezer(toy(), total_steps=30, t_init=10, t_final=5, window=5)
    assert ex.ex03_3({15, 20, 25}, fz) is True
    with pytest.raises(AssertionError):
        ex.ex03_3({15, 20}, fz)
    fz.remove()


def test_decision_steps_skip_decisions_with_k_zero():
    # rho just below 1: int(N (1 - rho)) = 0 at the first decision after t_i, so nothing can freeze there
    fz = am.AFLoRAFreezer(toy(), total_steps=1000, t_init=10, t_final=10, window=1)
    n = sum(p.numel() for p in fz.params.values())
    assert int(n * (1 - am.cubic_schedule(11, 1000, 10, 10))) == 0
    first = next(t for t in range(11, 990) if int(n * (1 - am.cubic_schedule(t, 1000, 10, 10))) >= 1)
    steps = ex._ex03_decision_steps(fz)
    assert first > 11 and steps == list(range(first, 991))
    fz.remove()


@pytest.mark.parametrize("rule", ["quantile", "rank"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decision_steps_contain_every_freeze_of_a_run(rule, seed):
    for T, ti, tf, w in [(30, 15, 3, 5), (40, 4, 12, 5), (57, 6, 17, 4), (100, 10, 70, 10)]:
        fz = drive(am.AFLoRAFreezer(toy(6), total_steps=T, t_init=ti, t_final=tf, window=w, rule=rule), seed)
        assert len(fz.frozen_at) == len(fz.params)
        assert set(fz.frozen_at.values()) <= set(ex._ex03_decision_steps(fz))


# ------------------------------------------------------------------ Ex 4: the rank rule (experiment)
T4, TI4, TF4, W4 = 30, 6, 9, 5                             # decisions 10, 15, 20 and T - t_f = 21
M4 = 24


@pytest.fixture(scope="module")
def fz_rank():
    return drive(am.AFLoRAFreezer(toy(12), total_steps=T4, t_init=TI4, t_final=TF4, window=W4, rule="rank"))


def rho4(t):
    return am.cubic_schedule(t, T4, TI4, TF4)


RIGHT_4 = {t: math.floor(M4 * rho4(t)) for t in (10, 15, 20, 21)}


def test_ex4_right(fz_rank, capsys):
    assert RIGHT_4 == {10: 9, 15: 1, 20: 0, 21: 0}
    assert ex.ex03_4(RIGHT_4, fz_rank) is True
    assert ex.ex03_4({np.int64(t): float(v) for t, v in RIGHT_4.items()}, fz_rank) is True
    assert capsys.readouterr().out.count("\u2713") == 2


@pytest.mark.parametrize("wrong", [
    {t: round(M4 * rho4(t)) for t in (10, 15, 20, 21)},                 # rounded to nearest
    {t: math.ceil(M4 * rho4(t)) for t in (10, 15, 20, 21)},             # rounded up
    {t: M4 - v for t, v in RIGHT_4.items()},                            # frozen, not trainable
    {10: 9, 15: 1, 20: 0},                                              # T - t_f left out
    {5: 24, 10: 9, 15: 1, 20: 0, 21: 0},                                # a warm-up window counted
    {t: math.floor(M4 * rho4(t)) for t in range(7, 22)},                # every step
    {11: 9, 16: 1, 21: 0, 22: 0},                                       # one step late
    {10: 10, 15: 2, 20: 1, 21: 0},
    [9, 1, 0, 0], "10: 9", {10: "9", 15: 1, 20: 0, 21: 0},
])
def test_ex4_rejects(fz_rank, wrong):
    with pytest.raises(AssertionError):
        ex.ex03_4(wrong, fz_rank)


def test_ex4_rejects_the_quantile_runs_counts(fz_rank):
    fz_q = drive(am.AFLoRAFreezer(toy(12), total_steps=T4, t_init=TI4, t_final=TF4, window=W4))
    counts = {t: sum(1 for n in fz_q.params if fz_q.frozen_at[n] > t) for t in (10, 15, 20, 21)}
    assert counts != RIGHT_4
    with pytest.raises(AssertionError):
        ex.ex03_4(counts, fz_rank)


def test_ex4_refuses_a_quantile_or_unrun_freezer():
    fz_q = drive(am.AFLoRAFreezer(toy(12), total_steps=T4, t_init=TI4, t_final=TF4, window=W4))
    with pytest.raises(RuntimeError):
        ex.ex03_4(RIGHT_4, fz_q)
    fresh = am.AFLoRAFreezer(toy(12), total_steps=T4, t_init=TI4, t_final=TF4, window=W4, rule="rank")
    with pytest.raises(RuntimeError):
        ex.ex03_4(RIGHT_4, fresh)
    fresh.remove()
