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
    assert ex.ex03_2(..., am.add_adapters(minilm_shaped(), "aflora", ["query", "intermediate.dense"], r=4,
                                          adaptive=True, train=())) is False
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


# a run whose exact time average is not a whole number: 569 / 10 = 56.9, and 569 // 10 = 56
HISTORY_F = [(0, 100), (4, 63), (7, 20)]
PER_STEP_F = [(t, 100 if t < 4 else 63 if t < 7 else 20) for t in range(1, 11)]


def test_ex1_accepts_integer_division_and_rounding(capsys):
    total = sum(c for _, c in PER_STEP_F)
    assert (total, total // 10) == (569, 56)
    for right in (total / 10, total // 10, round(total / 10), np.int64(total // 10)):
        assert ex.ex03_1(right, HISTORY_F, PER_STEP_F) is True     # 56 was rejected with "divide by T" before
    assert capsys.readouterr().out.count("\u2713") == 4


@pytest.mark.parametrize("wrong, hint", [
    (569, "divides it by the number of steps"),          # the sum, not divided
    (569 / 9, "you divided by 9"), (569 // 11, "you divided by 11"),
    (55, "not quite"), (58, "not quite"),
])
def test_ex1_says_divide_only_when_not_divided(wrong, hint):
    with pytest.raises(AssertionError, match=hint) as err:
        ex.ex03_1(wrong, HISTORY_F, PER_STEP_F)
    if hint == "not quite":
        assert "divide" not in str(err.value)


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


# ------------------------------------------------------------------ Ex 2: query and intermediate.dense, adaptive=True
EX2_TARGETS = ["query", "intermediate.dense"]
START_2 = 6 * ((4 + 384 + 4 * 384 + 384 * 4) + (4 + 1536 + 4 * 384 + 1536 * 4))      # 76,080
END_2 = 6 * ((4 + 384) + (4 + 1536))                                                   # 11,568


@pytest.fixture(scope="module")
def model_all():
    return am.add_adapters(minilm_shaped(), "aflora", EX2_TARGETS, r=4, adaptive=True, train=())


def test_ex2_right(model_all, capsys):
    assert (START_2, END_2) == (76_080, 11_568)
    assert ex.ex03_2((76_080, 11_568), model_all) is True
    assert ex.ex03_2([np.int64(76_080), 11_568.0], model_all) is True
    assert capsys.readouterr().out.count("\u2713") == 2


B_SIZED_D_IN = (6 * ((4 + 384 + 4 * 384 + 384 * 4) + (4 + 384 + 4 * 384 + 1536 * 4)), 6 * ((4 + 384) + (4 + 384)))


@pytest.mark.parametrize("wrong, hint", [
    (B_SIZED_D_IN, "d_out entries"),                  # b sized d_in: the old Ex 2 (all six targets) accepted this
    ((B_SIZED_D_IN[0], END_2), "d_out entries"),
    ((START_2, B_SIZED_D_IN[1]), "d_out entries"),
    ((6 * ((4 + 384) + (4 + 1536 + 4 * 384 + 1536 * 4)), END_2), "default policy"),   # query's A, B left frozen
    ((END_2, START_2), "swapped"),
    ((START_2 + 770, END_2), "classifier"),
    ((START_2, 0), "still train"),
    ((START_2 - END_2, END_2), "d and b train as well"),
    ((START_2, END_2 + 770), "d \\(r numbers\\)"),
    ((186_768, 20_880), None), ((113_040, 20_880), None),   # the six-target answers of the old exercise
    (START_2, None), ((START_2,), None), (("76080", "11568"), None), ((START_2 + 0.5, END_2), None),
])
def test_ex2_rejects(model_all, wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ex.ex03_2(wrong, model_all)


@pytest.mark.parametrize("wrong, hint", [
    ((START_2 + 770, END_2 + 770), "both numbers are off by the classifier head"),   # 76,850, 12,338
    ((6 * (4 + 1536 + 4 * 384 + 1536 * 4), 6 * (4 + 1536)), "intermediate.dense only"),   # 55,320, 9,240
])
def test_ex2_head_and_ffn_only_hints_come_before_the_end_count_hint(model_all, wrong, hint):
    assert wrong in {(76_850, 12_338), (55_320, 9_240)}
    with pytest.raises(AssertionError, match=hint) as err:
        ex.ex03_2(wrong, model_all)
    assert "once frozen, each layer keeps training" not in str(err.value)


def test_ex2_refuses_other_models():
    with pytest.raises(RuntimeError):                 # the default policy: query not adaptive
        ex.ex03_2((START_2, END_2), am.add_adapters(minilm_shaped(), "aflora", EX2_TARGETS, r=4, train=()))
    with pytest.raises(RuntimeError):                 # other targets
        ex.ex03_2((START_2, END_2), am.add_adapters(minilm_shaped(), "aflora", TARGETS, r=4, adaptive=True, train=()))


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


def test_ex3_hint_for_left_out_decisions_does_not_give_them_away(fz3):
    with pytest.raises(AssertionError, match="left out 1 decision step") as err:
        ex.ex03_3({25, 27}, fz3)
    assert "20" not in str(err.value)


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
    assert min(fz_rank.frozen_at.values()) == 10
    assert ex.ex03_4((RIGHT_4, 10), fz_rank) is True
    assert ex.ex03_4([{np.int64(t): float(v) for t, v in RIGHT_4.items()}, np.int64(10)], fz_rank) is True
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
])
def test_ex4_rejects_wrong_counts(fz_rank, wrong):
    with pytest.raises(AssertionError):
        ex.ex03_4((wrong, 10), fz_rank)


@pytest.mark.parametrize("first, hint", [
    (TI4, "warm-up"), (TI4 + 1, "not one"), (15, "your own counts"), (21, "your own counts"),
])
def test_ex4_checks_the_first_freeze(fz_rank, first, hint):
    # before: the question asked for the first freeze and nothing checked it
    with pytest.raises(AssertionError, match=hint):
        ex.ex03_4((RIGHT_4, first), fz_rank)


@pytest.mark.parametrize("wrong", [RIGHT_4, [9, 1, 0, 0], "10: 9", (RIGHT_4,), (RIGHT_4, 10, 15),
                                   ({10: "9", 15: 1, 20: 0, 21: 0}, 10), (RIGHT_4, "10"), (RIGHT_4, 10.5)])
def test_ex4_rejects_bad_forms(fz_rank, wrong):
    with pytest.raises(AssertionError):
        ex.ex03_4(wrong, fz_rank)


def test_ex4_rejects_the_quantile_runs_counts(fz_rank):
    fz_q = drive(am.AFLoRAFreezer(toy(12), total_steps=T4, t_init=TI4, t_final=TF4, window=W4))
    counts = {t: sum(1 for n in fz_q.params if fz_q.frozen_at[n] > t) for t in (10, 15, 20, 21)}
    assert counts != RIGHT_4
    with pytest.raises(AssertionError):
        ex.ex03_4((counts, min(fz_q.frozen_at.values())), fz_rank)


def test_ex4_refuses_a_quantile_or_unrun_freezer():
    fz_q = drive(am.AFLoRAFreezer(toy(12), total_steps=T4, t_init=TI4, t_final=TF4, window=W4))
    with pytest.raises(RuntimeError):
        ex.ex03_4((RIGHT_4, 10), fz_q)
    fresh = am.AFLoRAFreezer(toy(12), total_steps=T4, t_init=TI4, t_final=TF4, window=W4, rule="rank")
    with pytest.raises(RuntimeError):
        ex.ex03_4((RIGHT_4, 10), fresh)
    fresh.remove()


# ------------------------------------------------------------------ Ex 5: the rule, written by the student
BETA1, BETA2 = 0.85, 0.95


def freeze_now(window_grads, i_bar, u_bar, rho):
    """A right answer, written as a student would (not the check's own variant code)."""
    new_i, new_u, s = {}, {}, {}
    for n, grads in window_grads.items():
        I = torch.stack([g.abs() for g in grads]).mean(0)
        new_i[n] = BETA1 * i_bar[n] + (1 - BETA1) * I
        new_u[n] = BETA2 * u_bar[n] + (1 - BETA2) * (I - new_i[n]).abs()
        s[n] = new_i[n] * new_u[n]
    pooled = torch.cat([v.flatten() for v in s.values()])
    k = int(pooled.numel() * (1 - rho))
    if k < 1:
        return [], new_i, new_u
    q = pooled.kthvalue(k).values.item()
    return [n for n in s if s[n].mean().item() < q], new_i, new_u


def with_mistake(kind):
    """freeze_now with one plausible mistake."""
    def fn(window_grads, i_bar, u_bar, rho):
        new_i, new_u, s = {}, {}, {}
        for n, grads in window_grads.items():
            I = torch.stack([g.abs() for g in grads]).mean(0)
            new_i[n] = BETA1 * i_bar[n] + (1 - BETA1) * I
            old = i_bar[n] if kind == "old i_bar" else new_i[n]
            new_u[n] = BETA2 * u_bar[n] + (1 - BETA2) * (I - old).abs()
            s[n] = new_i[n] * new_u[n]
        means = {n: v.mean().item() for n, v in s.items()}
        if kind == "means":                              # the quantile over the matrix means
            pooled = torch.tensor(sorted(means.values()))
        else:
            pooled = torch.cat([v.flatten() for v in s.values()])
        k = int(pooled.numel() * (rho if kind == "rho" else 1 - rho))
        if k < 1:
            return [], new_i, new_u
        q = pooled.kthvalue(k).values.item()
        return [n for n in s if means[n] < q], new_i, new_u
    return fn


def test_ex5_right(capsys):
    assert ex.ex03_5(freeze_now) is True
    as_numpy = lambda *a: (set(freeze_now(*a)[0]), {n: v.numpy() for n, v in freeze_now(*a)[1].items()},
                           {n: v.numpy() for n, v in freeze_now(*a)[2].items()})
    assert ex.ex03_5(as_numpy) is True                   # a set and numpy arrays are fine
    assert ex.ex03_5(ex._ex03_5_variant("interpolated quantile")) is True   # the same decisions here
    assert capsys.readouterr().out.count("\u2713") == 3


@pytest.mark.parametrize("kind, hint", [
    ("means", "ELEMENT scores"),                         # the quantile over matrix means
    ("rho", "1 - rho"),                                  # rho for 1 - rho
    ("old i_bar", "NEW Ī"),
])
def test_ex5_rejects_student_mistakes(kind, hint):
    with pytest.raises(AssertionError, match=hint):
        ex.ex03_5(with_mistake(kind))


@pytest.mark.parametrize("kind", list(ex._EX03_5_HINTS))
def test_ex5_every_mistake_gets_its_hint(kind):
    with pytest.raises(AssertionError) as err:
        ex.ex03_5(ex._ex03_5_variant(kind))
    assert str(err.value) == ex._EX03_5_HINTS[kind]


def test_ex5_the_replay_tells_every_mistake_apart():
    # each mistake changes Ī, Ū or at least one decision of the replayed runs, and the right rule changes nothing
    fns = {k: ex._ex03_5_variant(k) for k in ["right", *ex._EX03_5_HINTS]}
    decisions = [d for run in ex._EX03_5_RUNS for d in ex._ex03_5_replay(fns, *run)]
    assert len(decisions) >= 10 and sum(len(d["frozen"]) for d in decisions) >= 30
    differs = lambda k, d: (set(d["answers"][k][0]) != d["frozen"] or not ex._ex03_5_same(d["answers"][k][1], d["i_bar"])
                            or not ex._ex03_5_same(d["answers"][k][2], d["u_bar"]))
    assert not any(differs("right", d) for d in decisions)
    assert all(any(differs(k, d) for d in decisions) for k in ex._EX03_5_HINTS)


@pytest.mark.parametrize("wrong, hint", [
    (lambda w, i, u, rho: list(w), "three things"),                       # only the names
    (lambda w, i, u, rho: ("x", i, u), "list or set"),
    (lambda w, i, u, rho: (["nope"], i, u), "not still-trainable"),
    (lambda w, i, u, rho: 1 / 0, "ZeroDivisionError"),
    (lambda w, i, u, rho: ([], i, u), "Ī differs"),                       # nothing updated, nothing frozen
    (lambda w, i, u, rho: (list(w), *freeze_now(w, i, u, rho)[1:]), "your Ī and Ū are right"),   # freezes all
    (42, "should be a function"),
])
def test_ex5_rejects_bad_functions(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ex.ex03_5(wrong)


def test_ex5_placeholder(capsys):
    assert ex.ex03_5(...) is False
    assert "not answered yet" in capsys.readouterr().out


def test_ex2_the_old_target_set_could_not_tell_b_sized_d_in():
    # all six targets: d_in and d_out sum the same over MiniLM's layers, so b sized d_in gave the right count;
    # query + intermediate.dense: they differ, and the check names the mistake
    six = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]
    two = [(384, 384), (384, 1536)]
    assert sum(i for i, _ in six) == sum(o for _, o in six)
    assert sum(i for i, _ in two) != sum(o for _, o in two)


# ------------------------------------------------------------------ notebook 03's helpers
def _records(protocol_runs):
    from bench import protocol as P
    return [dict(task=t, method=m, seed=s, kind="grid", mode="cpu", best=0.5)
            for t in P.TASKS for m in P.METHODS for s in P.SEEDS][:protocol_runs]


def test_cpu_grid_reads_v2_only_when_complete(tmp_path, monkeypatch):
    import json
    import helpers
    from bench import protocol as P
    monkeypatch.setattr(P, "RESULTS", tmp_path)
    (tmp_path / "glue_cpu.json").write_text(json.dumps(_records(45)))
    g = helpers.cpu_grid()
    assert (g["protocol"], g["file"], len(g["records"])) == ("v1", "glue_cpu.json", 45)
    assert "does not exist yet" in g["note"]
    (tmp_path / "glue_cpu_v2.json").write_text(json.dumps(_records(44)))
    g = helpers.cpu_grid()
    assert g["protocol"] == "v1" and "44 of 45" in g["note"]
    (tmp_path / "glue_cpu_v2.json").write_text(json.dumps(_records(45) + [dict(_records(1)[0], kind="lr_search")]))
    g = helpers.cpu_grid()
    assert (g["protocol"], g["file"], len(g["records"]), g["complete"]) == ("v2", "glue_cpu_v2.json", 45, True)


def test_seed_gap_verdicts():
    import helpers
    assert helpers.seed_gap([0.79, 0.788, 0.797], [0.781, 0.773, 0.787])["beyond"] is True     # the stored laptop run
    g = helpers.seed_gap([0.80, 0.70, 0.75], [0.76, 0.74, 0.74])
    assert g["beyond"] is False and g["wins"] == 2 and math.isclose(g["gap"], 0.0033333, abs_tol=1e-6)
    assert helpers.seed_gap([0.6], [0.5])["beyond"] is None                                    # one seed: no verdict


# ------------------------------------------------------------------ the notebook's structure (issue 18)
def _nb03_cells(name="03_aflora.ipynb"):
    import json
    from pathlib import Path
    return json.loads((Path(__file__).resolve().parents[1] / "notebooks" / name).read_text())["cells"]


@pytest.mark.parametrize("name", ["03_aflora.ipynb", "solutions/03_aflora_solutions.ipynb"])
def test_notebook_03_uses_the_nbval_tag_not_the_comment(name):
    code = [c for c in _nb03_cells(name) if c["cell_type"] == "code"]
    assert not [c["id"] for c in code if "NBVAL_IGNORE_OUTPUT" in "".join(c["source"])]
    assert any("nbval-ignore-output" in c["metadata"].get("tags", []) for c in code)


def test_notebook_03_takes_method_colours_from_helpers_and_hard_codes_no_result():
    cells = _nb03_cells()
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "helpers.METHOD_COLORS" in code and "helpers.METHOD_LABELS" in code
    assert not any(f'"{m}": "tab:' in code for m in ("lora", "elora", "aflora"))
    for stale in ("7.1 min", "5.4 min", "about 10 minutes", "0.549", "0.676", "165 of 180", "0.792 ± 0.005",
                  "Why the $B$ matrices freeze first"):
        assert stale not in text and stale not in code, stale
    assert text.count("https://github.com/zeyuliu1037/AFLoRA") >= 3


def test_notebook_03_reveals_the_rank_rule_plot_only_after_the_check():
    import ast
    check = next(c for c in _nb03_cells() if "exercises.ex03_4(" in "".join(c["source"]))
    (stmt,) = ast.parse("".join(check["source"])).body
    assert isinstance(stmt, ast.If) and "ex03_4" in ast.unparse(stmt.test)
    assert "rank_frac" in ast.unparse(stmt.body[0]) and "plot" in ast.unparse(stmt.body[1])
