"""Checks for the exercises of notebooks 01-03. Each check takes the student's answer (and whatever
the notebook computed that the answer must agree with) and:
  * prints a tick and returns True for a right answer,
  * raises AssertionError with a hint for a wrong answer (tests/test_exercises_*.py feed each check
    the plausible wrong answers and expect this),
  * prints "not answered yet" and returns False for the placeholder `...` (so a notebook with
    unanswered exercises still runs top to bottom).
The solutions are in notebooks/solutions/, out of sight of the exercise cells.
"""
from __future__ import annotations


def unanswered(answer) -> bool:
    """True (and a note is printed) while the answer cell still holds the placeholder `...`."""
    if answer is ...:
        print("not answered yet: replace the ... in the answer cell above, then run this cell again")
        return True
    return False


def ok(message: str) -> bool:
    print("\u2713 " + message)
    return True


# === notebook 01 ===
def _ex01_number(answer, name: str) -> float:
    """The answer as a float; a hint if it is not a plain number."""
    import numbers
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise AssertionError(f"{name} should be a plain number (e.g. 12345 or 1.5), got {answer!r}")
    return float(answer)


def _ex01_pair(answer, name: str, what: str) -> tuple[float, float]:
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise AssertionError(f"{name} should be a pair {what}, got {answer!r}")
    return _ex01_number(answer[0], name + "[0]"), _ex01_number(answer[1], name + "[1]")


def _ex01_close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


def ex01_1(answer, layer_shapes, r_new, built=None):
    """Ex 1: adapter parameters (A and B, classifier excluded) of LoRA at rank r_new.
    layer_shapes: {adapted layer name: (d_in, d_out)}; built: the count of a model built at r_new
    (a second, independent truth)."""
    if unanswered(answer):
        return False
    truth = r_new * sum(i + o for i, o in layer_shapes.values())
    if built is not None:
        assert built == truth, (f"the model built in this cell has {built:,d} adapter parameters, the "
                                f"formula gives {truth:,d}: rebuild it with the same targets and rank")
    a = _ex01_number(answer, "answer_1")
    if a == truth:
        return ok(f"{truth:,d} adapter parameters at r = {r_new}: r (d_in + d_out) per layer, linear in r")
    n = len(layer_shapes)
    if a == truth // 2:
        raise AssertionError("that is the count at half the rank: the rank doubled, and each layer's "
                             "count r (d_in + d_out) grows with it")
    if a == 2 * truth:
        raise AssertionError("the count is linear in r, not quadratic: A is r x d_in, B is d_out x r")
    if 0 < a - truth < 10_000:
        raise AssertionError("count only the adapters' A and B: the classifier head is trained too, "
                             "but it is not part of this count")
    if a == sum(i * o for i, o in layer_shapes.values()):
        raise AssertionError("that is d_in x d_out per layer, what full fine-tuning of these layers "
                             "trains; LoRA trains A (r x d_in) and B (d_out x r)")
    raise AssertionError(f"not quite: each of the {n} adapted layers trains A (r x d_in) and B "
                         f"(d_out x r), r (d_in + d_out) numbers; sum that over the layers at r = {r_new}")


def ex01_2(answer, layer_shapes, r, full_ft, built=None):
    """Ex 2: LoRA at rank r on query and value only: (adapter parameters, percent of full
    fine-tuning's full_ft trainable parameters). built: the count of a model built that way."""
    if unanswered(answer):
        return False
    qv = [s for name, s in layer_shapes.items() if name.endswith((".query", ".value"))]
    truth_n = r * sum(i + o for i, o in qv)
    truth_pct = 100 * truth_n / full_ft
    if built is not None:
        assert built == truth_n, (f"the model built in this cell has {built:,d} adapter parameters, "
                                  f"the formula gives {truth_n:,d}: rebuild it on query and value only")
    n, pct = _ex01_pair(answer, "answer_2", "(parameters, percent), e.g. (12345, 0.0543)")
    if n != truth_n:
        if n == r * sum(i + o for i, o in layer_shapes.values()):
            raise AssertionError("that count adapts all six linear layers of each block; count only "
                                 "query and value")
        if len(qv) and n * len(qv) == truth_n * 2:
            raise AssertionError("that is one block's query and value: there is one of each in every layer")
        if n == sum(i * o for i, o in qv):
            raise AssertionError("that is d_in x d_out per matrix (full fine-tuning of those matrices); "
                                 "LoRA trains r (d_in + d_out) per matrix")
        raise AssertionError(f"the parameter count is off: r (d_in + d_out) for each of the {len(qv)} "
                             "query and value matrices")
    if _ex01_close(pct, truth_pct, 0.002):     # three significant figures, rounded or truncated
        return ok(f"{truth_n:,d} parameters, {truth_pct:.3f}% of full fine-tuning's {full_ft:,d}")
    if _ex01_close(pct, truth_pct / 100, 0.1):
        raise AssertionError("that is a fraction, not a percentage: multiply by 100")
    if _ex01_close(pct, truth_pct, 0.03):
        raise AssertionError(f"close, but not within three significant figures: divide by full "
                             f"fine-tuning's trainable count ({full_ft:,d}, the pretrained model with "
                             "its head), not by a count that includes the adapters")
    raise AssertionError("percent = 100 x adapter parameters / full fine-tuning's trainable parameters")


def ex01_3(answer, r, alpha_old, alpha_new, measured=None):
    """Ex 3: the factor by which ΔW changes when alpha goes alpha_old -> alpha_new with the same A, B.
    measured: ||ΔW(alpha_new)|| / ||ΔW(alpha_old)|| from two layers sharing A and B."""
    if unanswered(answer):
        return False
    truth = (alpha_new / r) / (alpha_old / r)
    if measured is not None:
        assert _ex01_close(measured, truth, 1e-4), (f"the two layers' ΔW differ by {measured:.4g}, not by "
                                               f"{truth:g}: do they share A and B?")
    a = _ex01_number(answer, "answer_3")
    if _ex01_close(a, truth, 1e-3):
        return ok(f"ΔW is multiplied by {truth:g}: the scaling α/r goes from {alpha_old / r:g} to "
                  f"{alpha_new / r:g}")
    if a == alpha_new or a == alpha_new / r * alpha_old:
        raise AssertionError("ΔW = (α/r) B A: with the same B and A only the scaling α/r changes; "
                             "compare the scaling before and after")
    if _ex01_close(a, 1 / truth, 1e-3):
        raise AssertionError("inverted: a larger α gives a larger ΔW")
    if _ex01_close(a, truth ** 2, 1e-3):
        raise AssertionError("A and B are the same here, nothing is trained: only the scaling α/r changes")
    if a == 1:
        raise AssertionError("ΔW = (α/r) B A does change with α")
    raise AssertionError("ΔW = (α/r) B A: compute α/r before and after, with r unchanged")


def ex01_4(answer, alpha_old, alpha_new, measured=None):
    """Ex 4 (experiment): predicted (SGD ratio, Adam ratio) of ||ΔW|| after one optimizer step from
    the same start (B = 0, same A, same batch and learning rate), alpha_new vs alpha_old.
    measured: {"SGD": ratio, "Adam": ratio} from the notebook's run."""
    if unanswered(answer):
        return False
    c = alpha_new / alpha_old
    truth = {"SGD": c ** 2, "Adam": c}
    if measured is not None:
        assert _ex01_close(measured["SGD"], truth["SGD"], 0.01) and _ex01_close(measured["Adam"], truth["Adam"], 0.05), \
            f"the run measured {measured}; one step from B = 0 should give SGD {c ** 2:g}, Adam {c:g}: rerun the experiment cell"
    sgd, adam = _ex01_pair(answer, "answer_4", "(ratio under SGD, ratio under Adam), e.g. (2, 3)")
    sgd_ok, adam_ok = _ex01_close(sgd, truth["SGD"], 0.05), _ex01_close(adam, truth["Adam"], 0.05)
    if sgd_ok and adam_ok:
        return ok(f"SGD {c ** 2:g}x, Adam {c:g}x: under SGD α enters twice (in B's gradient and in ΔW = "
                  "(α/r) B A); Adam's step ignores the gradient's size, so only the second factor remains")
    if _ex01_close(sgd, truth["Adam"], 0.05) and _ex01_close(adam, truth["SGD"], 0.05):
        raise AssertionError("swapped: the pair is (SGD, Adam)")
    hints = []
    if not sgd_ok:
        hints.append(f"SGD: B's first step is -lr x (its gradient), and that gradient contains α/r too; "
                     f"ΔW = (α/r) B A then multiplies by α/r again")
    if not adam_ok:
        hints.append("Adam: its first step is about lr x sign(gradient), whatever the gradient's size, "
                     "so B comes out the same; ΔW = (α/r) B A still carries α/r once")
    raise AssertionError("; ".join(hints))



# === notebook 02 ===
def _ex02_number(answer, name: str) -> float:
    """The answer as a float; a hint if it is not a plain number."""
    import numbers
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise AssertionError(f"{name} should be a plain number (e.g. 12345 or 1.5), got {answer!r}")
    return float(answer)


def ex02_1(answer, layer_shapes, r_new, built=None):
    """Ex 1: ELoRA's trainable adapter parameters (d and b, classifier excluded) at rank r_new.
    layer_shapes: [(d_in, d_out)] of the adapted layers; built: the count of a model built at r_new."""
    if unanswered(answer):
        return False
    truth = sum(r_new + o for _, o in layer_shapes)
    if built is not None:
        assert built == truth, (f"the model built in this cell has {built:,d} trainable adapter numbers, "
                                f"the formula gives {truth:,d}: rebuild it with the same targets and rank")
    a = _ex02_number(answer, "answer_1")
    if a == truth:
        return ok(f"{truth:,d}: r + d_out per layer; only the d vectors shrink with r, the b vectors stay")
    n = len(layer_shapes)
    if a == sum(r_new * (i + o) for i, o in layer_shapes):
        raise AssertionError("that is LoRA's count r (d_in + d_out): ELoRA's A and B are frozen, only the "
                             "vectors d (r numbers) and b (d_out numbers) train")
    if a == n * r_new:
        raise AssertionError("that counts d only: every layer also trains b, one number per output feature")
    if a == sum(o for _, o in layer_shapes):
        raise AssertionError("that counts b only: every layer also trains d, one number per rank")
    if a == sum(1024 + o for _, o in layer_shapes):
        raise AssertionError(f"that is the count at r = 1024; the question asks for r = {r_new}")
    if a in {r_new + o for _, o in layer_shapes}:
        raise AssertionError(f"that is one layer's count; sum r + d_out over all {n} adapted layers")
    raise AssertionError(f"not quite: each of the {n} adapted layers trains d (r numbers) and b (d_out "
                         f"numbers); sum r + d_out over the layers at r = {r_new}")


def ex02_2(answer, elora_params, layer_shapes):
    """Ex 2: the LoRA rank (a real number) that trains as many adapter parameters as ELoRA's
    elora_params, on the same layers."""
    if unanswered(answer):
        return False
    per_rank = sum(i + o for i, o in layer_shapes)           # LoRA's count per unit of rank
    truth = elora_params / per_rank
    a = _ex02_number(answer, "answer_2")
    if abs(a - truth) <= 0.015:
        return ok(f"r = {elora_params:,d} / {per_rank:,d} = {truth:.2f}: ELoRA r=1024 trains about what "
                  f"LoRA at rank {truth:.1f} would (between r = 1 and r = 2)")
    if a in (1, 2):
        raise AssertionError("the count lies between those of two whole ranks; give the real number "
                             "r = (ELoRA's count) / (LoRA's count per unit of rank)")
    if abs(a - 1 / truth) <= 0.015:
        raise AssertionError("inverted: LoRA's count is r x (its count per unit of rank); solve for r")
    if abs(a - 8 * per_rank / elora_params) <= 0.05:
        raise AssertionError("that is how many times more LoRA r=8 trains than ELoRA, not a rank")
    if a == 1024:
        raise AssertionError("LoRA at r = 1024 would train 1024 x (d_in + d_out) per layer, about 740x "
                             "ELoRA's count: the ranks are not comparable, the counts are")
    raise AssertionError("LoRA trains r (d_in + d_out) per layer: divide ELoRA's count by the sum of "
                         "d_in + d_out over the adapted layers")


def ex02_3(answer, layer, run_seed, name):
    """Ex 3: the seed that rebuilds the random A, B of the adapter layer `layer` (named `name`, from a
    run seeded run_seed). Checked by rebuilding the layer from the answer and comparing A and B."""
    if unanswered(answer):
        return False
    import re
    import numbers
    import torch
    import aflora_min as am
    if isinstance(answer, bool) or not isinstance(answer, numbers.Integral):
        raise AssertionError(f"answer_3 should be an integer seed, got {answer!r}")
    rebuilt = am.ELoRALinear(torch.nn.Linear(layer.in_features, layer.out_features), r=layer.r,
                             seed=int(answer))
    if torch.equal(rebuilt.lora_A, layer.lora_A) and torch.equal(rebuilt.lora_B, layer.lora_B):
        return ok(f"seed {int(answer)} rebuilds A and B exactly: the checkpoint needs the run seed and "
                  "the layer name, never the matrices")
    if answer == run_seed:
        raise AssertionError(f"the run seed {run_seed} is not any layer's seed: add_adapters gives every "
                             "layer its own seed, hashed from (run seed, layer name), so no two layers "
                             "share A and B")
    index = re.search(r"layer\.(\d+)\.", name)
    if index and answer == run_seed + int(index.group(1)):
        raise AssertionError("run seed + layer index would make run s+1's layer i equal run s's layer "
                             "i+1; the seed is a hash of the run seed and the layer's full name")
    raise AssertionError("these are not the layer's matrices: the seed comes from the run seed and the "
                         "layer's full dotted name (see the cell above)")


def ex02_4(answer, n_tokens, d_in, d_out):
    """Ex 4: the rank above which the weight path costs fewer extra multiply-adds than the token path,
    for a (d_in -> d_out) layer and n_tokens tokens, fp32 (ΔW fused into W0)."""
    if unanswered(answer):
        return False
    import torch
    import aflora_min as am
    n, i, o = n_tokens, d_in, d_out
    truth = n * i * o / (2 * n * (i + o) - 3 * i * o)
    # a second, independent truth: the library's own choice just below and just above the answer
    x = torch.zeros(n, i)
    below, above = int(truth), int(truth) + 1
    for r, path in ((below, "token"), (above, "weight")):
        got = am.ELoRALinear(torch.nn.Linear(i, o), r=r).choose_path(x)
        assert got == path, f"library disagrees with the formula at r = {r}: {got}"
    a = _ex02_number(answer, "answer_4")
    if abs(a - truth) <= 0.5:
        return ok(f"r* = n in out / (2 n (in + out) - 3 in out) = {truth:.1f}: auto takes the token path "
                  f"at r = {below} and the weight path at r = {above}")
    limit = i * o / (2 * (i + o))
    if abs(a - limit) <= 0.5:
        raise AssertionError(f"{limit:.1f} is the limit for very many tokens; at n = {n} the weight path "
                             "also pays 3 out r in to form ΔW and its gradients, which moves r* up")
    if abs(a - 96) <= 0.5 or abs(a - n * 384 * 384 / (2 * n * 768 - 3 * 384 * 384)) <= 0.5:
        raise AssertionError(f"that is the square 384 x 384 layer's value; this layer is {i} -> {o}")
    if abs(a - 3 * truth) <= 1.5:
        raise AssertionError("that counts the ΔW gradient as 3 n in out, the unfused case; in fp32 ΔW is "
                             "folded into W0, and only its gradient gyᵀ x (n in out) is extra")
    if 2 * n * (i + o) > 6 * i * o and abs(a - n * i * o / (n * (i + o) - 3 * i * o)) <= 0.5:
        raise AssertionError("the token path costs 2 n r (in + out): A x and B h forward, and their two "
                             "input gradients backward")
    raise AssertionError("the weight path is cheaper when 3 out r in + n in out < 2 n r (in + out); "
                         "solve for r")


def ex02_5(answer, n_tokens, layer_shapes, r, auto_paths):
    """Ex 5 (experiment): which path ELoRA's auto picks (the one with fewer multiply-adds) on every
    adapted layer for one short sentence of n_tokens tokens at rank r. auto_paths: the library's
    choice per layer (layer.choose_path on that input), a second truth."""
    if unanswered(answer):
        return False
    truths = set()
    for i, o in layer_shapes:
        token = 2 * n_tokens * r * (i + o)
        weight = 3 * o * r * i + n_tokens * i * o
        truths.add("weight" if weight < token else "token")
    assert len(truths) == 1, f"the layers disagree ({truths}): pick an input of another length"
    truth = truths.pop()
    assert set(auto_paths) == {truth}, f"the library picked {set(auto_paths)}, the formula {truth}"
    if not isinstance(answer, str) or answer.strip().lower() not in ("token", "weight"):
        raise AssertionError(f"answer_5 should be 'token' or 'weight', got {answer!r}")
    if answer.strip().lower() == truth:
        return ok(f"'{truth}': with n = {n_tokens} tokens, sending them through A and B costs "
                  f"2 n r (in + out), far less than forming ΔW (3 out r in) once")
    if truth == "token":
        raise AssertionError(f"r = {r} is above the many-token crossover, but that limit assumes many "
                             f"tokens: here n = {n_tokens}, and forming ΔW costs 3 out r in whatever n is, "
                             "while the token path costs only 2 n r (in + out)")
    raise AssertionError("with this many tokens, forming ΔW once is cheaper than sending every token "
                         "through A and B")



# === notebook 03 ===
def _ex03_int(value, name: str) -> int:
    """value as an int (numpy ints and integral floats accepted); a hint otherwise."""
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or float(value) != int(value):
        raise AssertionError(f"{name} should be a whole number of steps or parameters, got {value!r}")
    return int(value)


def _ex03_decision_steps(freezer) -> list[int]:
    """The steps at which `freezer` can freeze a matrix, computed from its settings alone: every
    window-th step after the warm-up where the rule's k = int(N (1 - rho)) is at least 1 (N: the
    elements of all adaptive matrices), and t = T - t_f, where rho = 0 and everything left freezes."""
    import aflora_min as am
    T, ti, tf, w = freezer.total_steps, freezer.t_init, freezer.t_final, freezer.window
    n = sum(p.numel() for p in freezer.params.values())
    steps = set()
    for t in range(1, T - tf):
        rho = am.cubic_schedule(t, T, ti, tf)
        if t % w == 0 and t > ti and (freezer.rule == "rank" or int(n * (1.0 - rho)) >= 1):
            steps.add(t)
    steps.add(T - tf)
    return sorted(steps)


def ex03_1(answer, history, per_step):
    """Ex 1: the time-averaged trainable adapter count, computed from freezer.history (the change
    points (step, count)). per_step: helpers.train's hist["trainable"], (step, count) after each
    step: the independent truth, whose mean is the time average."""
    if unanswered(answer):
        return False
    import numbers
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise AssertionError(f"answer_1 should be a number (parameters), got {answer!r}")
    a = float(answer)
    counts = [c for _, c in per_step]
    T = len(counts)
    truth = sum(counts) / T

    def integrate(counts_from):        # counts_from(s, t): does the entry at step t hold at step s?
        total = 0
        for s in range(1, T + 1):
            total += [c for t, c in history if counts_from(s, t)][-1]
        return total / T
    if abs(integrate(lambda s, t: t <= s) - truth) > 1e-6 * truth:
        raise RuntimeError("freezer.history and the per-step counts disagree: pass the history and the "
                           "hist['trainable'] of the same run")
    if abs(a - truth) <= 0.5:
        return ok(f"{truth:,.1f} trainable adapter parameters on average over the {T} steps: each count "
                  "holds from the step it was recorded at (a matrix frozen at step s takes no update at step s)")
    late = integrate(lambda s, t: t < s)
    if abs(a - late) <= 0.5:
        raise AssertionError("one step off: you counted a matrix frozen at step s as trainable at step s "
                             "too. It takes no update at step s, so the count recorded at step s holds "
                             "from step s on")
    if abs(a - sum(c for _, c in history) / len(history)) <= 0.5:
        raise AssertionError("that is the plain mean of the history's entries; weight each count by the "
                             "number of steps it holds")
    if abs(a - history[0][1]) <= 0.5 or abs(a - history[-1][1]) <= 0.5:
        raise AssertionError("that is the count at the start or at the end; the time average lies between")
    for other in (T - 1, T + 1):
        if abs(a - truth * T / other) <= 0.5:
            raise AssertionError(f"divide by the number of steps, T = {T}")
    raise AssertionError(f"not quite: sum, over steps s = 1..{T}, the count of the last history entry at or "
                         f"before s, and divide by {T}")


def ex03_2(answer, model_all_adaptive):
    """Ex 2: (trainable adapter parameters at the start, once every A and B is frozen) of AFLoRA with
    adaptive=True in every adapted layer. model_all_adaptive: such a model, built in the notebook."""
    if unanswered(answer):
        return False
    import aflora_min as am
    layers = [m for _, m in am.adapter_layers(model_all_adaptive)]
    if not layers or not all(isinstance(m, am.AFLoRALinear) and m.adaptive for m in layers):
        raise RuntimeError("build the model with add_adapters(..., 'aflora', ..., adaptive=True)")
    start = sum(m.r + m.out_features + m.r * m.in_features + m.out_features * m.r for m in layers)
    end = sum(m.r + m.out_features for m in layers)
    built = am.AFLoRAFreezer.trainable_adapter_params(model_all_adaptive)
    if built != start:
        raise RuntimeError(f"the model has {built:,d} trainable adapter parameters, the shapes give {start:,d}: "
                           "pass a freshly built model")
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise AssertionError(f"answer_2 should be a pair (at the start, once frozen), got {answer!r}")
    s, e = _ex03_int(answer[0], "answer_2[0]"), _ex03_int(answer[1], "answer_2[1]")
    if (s, e) == (start, end):
        return ok(f"{start:,d} at the start, {end:,d} once frozen: every one of the {len(layers)} layers trains "
                  f"A and B until they freeze, d and b to the end ({2 * len(layers)} matrices to freeze)")
    if (s, e) == (end, start):
        raise AssertionError("swapped: the pair is (at the start, once everything is frozen)")
    if (s, e) == (113_040, 20_880):
        raise AssertionError("that is the default policy, where only the two FFN matrices of each layer train "
                             "A and B; with adaptive=True the square attention matrices do too")
    if e != end:
        if e == 0:
            raise AssertionError("once A and B are frozen, d (r) and b (d_out) of every layer still train")
        raise AssertionError("once frozen, each layer keeps training d (r numbers) and b (d_out numbers)")
    if 0 < s - start < 10_000:
        raise AssertionError("count the adapters only: the classifier head trains too, but is not counted")
    if s == start - end:
        raise AssertionError("at the start d and b train as well as A and B")
    raise AssertionError("at the start each layer trains d (r), b (d_out), A (r x d_in) and B (d_out x r)")


def ex03_3(answer, freezer):
    """Ex 3: the set of steps at which `freezer` (built with the exercise's T, t_i, t_f, window) can
    freeze a matrix. The truth comes from the freezer's settings (see _ex03_decision_steps)."""
    if unanswered(answer):
        return False
    T, ti, tf, w = freezer.total_steps, freezer.t_init, freezer.t_final, freezer.window
    truth = set(_ex03_decision_steps(freezer))
    if not set(freezer.frozen_at.values()) <= truth:
        raise RuntimeError(f"this freezer froze at steps {sorted(set(freezer.frozen_at.values()))}, outside "
                           f"{sorted(truth)}")
    if isinstance(answer, (str, bytes, dict)) or not hasattr(answer, "__iter__"):
        raise AssertionError(f"answer_3 should be a set of step numbers, e.g. {{4, 8}}, got {answer!r}")
    steps = {_ex03_int(t, "each step in answer_3") for t in answer}
    if steps == truth:
        return ok(f"steps {sorted(truth)}: a decision every {w} steps after the warm-up (t_i = {ti}), and the "
                  f"forced one at T - t_f = {T - tf}, where rho = 0")
    hints = []
    off_grid = sorted(t for t in steps if t % w and t != T - tf)
    if off_grid:
        hints.append(f"the freezer decides only every {w} steps (and at T - t_f): not at {off_grid[:5]}"
                     + (" ..." if len(off_grid) > 5 else ""))
    early = sorted(t for t in steps if t <= ti)
    if early:
        hints.append(f"nothing freezes during the warm-up, t <= t_i = {ti}: not at {early}")
    late = sorted(t for t in steps if t > T - tf)
    if late:
        hints.append(f"every matrix is frozen by T - t_f = {T - tf}: not at {late}")
    if T - tf not in steps:
        hints.append(f"at T - t_f = {T - tf}, rho reaches 0 and whatever is left freezes, on the window grid "
                     "or not")
    missing = sorted(truth - steps - {T - tf})
    if missing:
        hints.append(f"a decision after the warm-up can freeze a matrix: you left out {missing}")
    raise AssertionError("; ".join(hints) or "not quite")


def ex03_4(answer, freezer_rank):
    """Ex 4 (experiment): {decision step t: matrices still trainable after the decision at t} for a
    run with rule='rank'. The truth is the run's frozen_at; the run must agree with the schedule
    (the rank rule leaves floor(M rho(t)) of the M matrices trainable)."""
    if unanswered(answer):
        return False
    import math
    import aflora_min as am
    fz = freezer_rank
    if fz.rule != "rank":
        raise RuntimeError("run the experiment with AFLoRAFreezer(..., rule='rank')")
    if fz.step_count < fz.total_steps - fz.t_final:
        raise RuntimeError("run the experiment's training first: the freezer has not reached T - t_f yet")
    M, T, ti, tf = len(fz.params), fz.total_steps, fz.t_init, fz.t_final
    steps = _ex03_decision_steps(fz)
    truth = {t: sum(1 for n in fz.params if fz.frozen_at.get(n, T + 1) > t) for t in steps}
    rho = {t: am.cubic_schedule(t, T, ti, tf) for t in steps}
    formula = {t: M - math.ceil((1.0 - rho[t]) * M - 1e-9) for t in steps}
    if truth != formula:
        raise RuntimeError(f"the run left {truth} trainable, the schedule says {formula}")
    if not isinstance(answer, dict):
        raise AssertionError("answer_4 should be a dict {decision step: matrices still trainable after it}")
    a = {_ex03_int(k, "each step (key) in answer_4"): _ex03_int(v, "each count (value) in answer_4")
         for k, v in answer.items()}
    if a == truth:
        first = min(n for n in fz.frozen_at.values())
        return ok(f"the rank rule tracks the schedule exactly: floor({M} rho(t)) matrices stay trainable after "
                  f"each decision, and the first freeze comes at the first decision after the warm-up, t = {first}")
    if set(a) != set(truth):
        extra, missing = sorted(set(a) - set(truth)), sorted(set(truth) - set(a))
        raise AssertionError(f"the keys should be the decision steps {steps} (every {fz.window} steps after t_i "
                             f"= {ti}, and T - t_f = {T - tf}); extra: {extra[:6]}, missing: {missing[:6]}")
    if a == {t: M - v for t, v in truth.items()}:
        raise AssertionError("those are the frozen matrices; the question asks how many are still trainable")
    if a == {t: round(M * rho[t]) for t in steps} or a == {t: math.ceil(M * rho[t] - 1e-9) for t in steps}:
        raise AssertionError(f"rounding: the rank rule freezes until the frozen fraction reaches 1 - rho, rounding "
                             f"the frozen count up, so floor({M} rho(t)) stay trainable")
    wrong = sorted(t for t in steps if a[t] != truth[t])
    raise AssertionError(f"not at steps {wrong[:6]}: after the decision at t, the rank rule leaves "
                         f"{M} - ceil((1 - rho(t)) {M}) matrices trainable")

