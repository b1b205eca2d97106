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


def _classifier_size(model=None, shapes=(), labels: int = 2) -> int:
    """Parameters of the classifier head: counted from `model.classifier` when the model has one, else
    a Linear(hidden, labels) with hidden the smallest layer width of `shapes` (MiniLM-L6: 384, so 770)."""
    head = getattr(model, "classifier", None) if model is not None else None
    if head is not None and hasattr(head, "parameters"):
        return sum(p.numel() for p in head.parameters())
    dims = [d for shape in shapes for d in shape]
    hidden = min(dims) if dims else 384
    return hidden * labels + labels


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


def _ex01_sig_figures(x: float) -> int:
    """Significant figures of x as written (its shortest repr): 0.32 -> 2, 0.325 -> 3."""
    from decimal import Decimal
    if x == 0:
        return 1
    return len(Decimal(repr(float(x))).normalize().as_tuple().digits)


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
    if a - truth == _classifier_size(shapes=layer_shapes.values()):
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
    import math
    unit3 = 10.0 ** (math.floor(math.log10(truth_pct)) - 2)   # one unit in the third significant figure
    if abs(pct - truth_pct) <= 0.5 * unit3 * (1 + 1e-9):     # the truth rounded to 3 or more figures
        return ok(f"{truth_n:,d} parameters, {truth_pct:.3g}% of full fine-tuning's {full_ft:,d}")
    if _ex01_close(pct, truth_pct / 100, 0.1):
        raise AssertionError("that is a fraction, not a percentage: multiply by 100")
    k = _ex01_sig_figures(pct)
    if k < 3 and abs(pct - truth_pct) <= 10.0 ** (math.floor(math.log10(truth_pct)) - k + 1):
        if _ex01_close(pct, float(f"{truth_pct:.{k}g}"), 1e-9):
            raise AssertionError(f"right up to rounding, but you gave {k} significant figure{'s' * (k > 1)}: "
                                 "round the percentage to three significant figures")
        raise AssertionError(f"close, but that is not the exact percentage rounded to {k} significant "
                             f"figure{'s' * (k > 1)} (rounding an already rounded value can go the wrong way): "
                             "compute 100 x adapters / full fine-tuning's count and round it once, to three "
                             "significant figures")
    with_adapters = 100 * truth_n / (full_ft + truth_n)
    all_six = full_ft + r * sum(i + o for i, o in layer_shapes.values())
    truncated = math.floor(truth_pct / unit3 + 1e-9) * unit3
    if abs(pct - with_adapters) <= 0.5 * unit3 and abs(pct - truncated) <= 1e-9 * unit3 + 1e-12:
        raise AssertionError("either you truncated instead of rounding (round to the nearest third "
                             f"significant figure), or you divided by {full_ft + truth_n:,d}, the adapted "
                             f"model's total: the denominator is full fine-tuning's {full_ft:,d}")
    if abs(pct - with_adapters) <= 0.5 * unit3:
        raise AssertionError(f"you divided by {full_ft + truth_n:,d}, the adapted model's total (adapters "
                             f"included): the denominator is full fine-tuning's {full_ft:,d}")
    if abs(pct - 100 * truth_n / all_six) <= 0.5 * unit3:
        raise AssertionError(f"you divided by {all_six:,d}, the total of the model adapted on all six "
                             f"kinds of layer (section 3): the denominator is full fine-tuning's {full_ft:,d}")
    if abs(pct - truncated) <= 1e-9 * unit3 + 1e-12:
        raise AssertionError("truncated: round to the nearest third significant figure instead")
    if _ex01_close(pct, truth_pct, 0.03):
        raise AssertionError(f"close, but not 100 x {truth_n:,d} / {full_ft:,d} to three significant "
                             "figures: the numerator counts the adapters only, the denominator is full "
                             "fine-tuning's trainable count (the pretrained model with its head)")
    raise AssertionError("percent = 100 x adapter parameters / full fine-tuning's trainable parameters")


def ex01_3(answer, r_old, alpha_old, r_new, alphas_new, measured=None):
    """Ex 3: a trained layer (rank r_old, alpha_old) grown to rank r_new with B A unchanged (the new
    columns of B are zero), built once per alpha in alphas_new: the factor by which ΔW is multiplied,
    one per alpha, as a tuple. measured: ||ΔW_new|| / ||ΔW_old|| of the built layers, in that order."""
    if unanswered(answer):
        return False
    alphas_new = tuple(alphas_new)
    truth = tuple((a / r_new) / (alpha_old / r_old) for a in alphas_new)
    if measured is not None:
        assert len(measured) == len(truth) and all(_ex01_close(m, t, 1e-4) for m, t in zip(measured, truth)), \
            (f"the grown layers' ΔW differ from the trained layer's by {tuple(round(m, 4) for m in measured)}, "
             "which α/r cannot explain: does each keep B A (the trained A and B copied into the first "
             f"{r_old} rows of A and columns of B, the other columns of B zero)?")
    what = "(" + ", ".join(f"factor with α = {a:g}" for a in alphas_new) + ")"
    if not isinstance(answer, (tuple, list)) or len(answer) != len(truth):
        raise AssertionError(f"answer_3 should be a tuple {what}, got {answer!r}")
    got = tuple(_ex01_number(a, f"answer_3[{i}]") for i, a in enumerate(answer))
    if all(_ex01_close(g, t, 1e-3) for g, t in zip(got, truth)):
        return ok("ΔW = (α/r) B A with B A unchanged: only the scaling moves, from "
                  f"{alpha_old:g}/{r_old} to " + " and ".join(f"{a:g}/{r_new}" for a in alphas_new) +
                  ", factors " + ", ".join(f"{t:g}" for t in truth))
    if len(got) > 1 and all(_ex01_close(g, t, 1e-3) for g, t in zip(got, reversed(truth))):
        if all(_ex01_close(g, 1 / t, 1e-3) for g, t in zip(got, truth)):
            raise AssertionError(f"swapped or inverted (here the two look the same): the tuple is {what}, "
                                 "and each factor is ΔW(new) / ΔW(trained), not ΔW(trained) / ΔW(new)")
        raise AssertionError(f"swapped: the tuple is {what}")
    if all(_ex01_close(g, 1, 1e-3) for g in got):
        how = "doubled" if r_new == 2 * r_old else f"went from {r_old} to {r_new}"
        raise AssertionError(f"B A is unchanged, but α/r is not: r {how}, and ΔW = (α/r) B A")
    hints = []
    for a, g, t in zip(alphas_new, got, truth):
        if _ex01_close(g, t, 1e-3):
            continue
        if _ex01_close(g, a / alpha_old, 1e-3):
            h = (f"that is α's ratio alone: the scale is α/r, and r went from {r_old} to {r_new} too; "
                 "compare α/r before and after")
        elif _ex01_close(g, (a / alpha_old) * (r_new / r_old), 1e-3):
            h = "upside down in r: a larger r with the same α makes the scaling α/r smaller, not larger"
        elif _ex01_close(g, 1 / t, 1e-3):
            h = "inverted: the factor is ΔW(new) / ΔW(trained)"
        elif _ex01_close(g, t ** 2, 1e-3):
            h = "B A is the same here, nothing is trained: only the scaling α/r changes, once"
        elif _ex01_close(g, 1, 1e-3):
            h = "B A is unchanged, but ΔW = (α/r) B A and α/r is not"
        else:
            h = f"ΔW = (α/r) B A with the same B A: divide the new α/r by the old one ({alpha_old:g}/{r_old})"
        hints.append((a, h))
    if len(hints) == len(truth) and len({h for _, h in hints}) == 1:
        raise AssertionError(f"both factors: {hints[0][1]}")
    raise AssertionError("; ".join(f"with α = {a:g}: {h}" for a, h in hints))


def ex01_4(answer, alpha_old, alpha_new, measured=None):
    """Ex 4 (experiment): predicted (SGD ratio, Adam ratio) of ||ΔW|| after one optimizer step from
    the same start (B = 0, same A, same batch and learning rate), alpha_new vs alpha_old.
    measured: {"SGD": ratio, "Adam": ratio} from the notebook's run."""
    if unanswered(answer):
        return False
    c = alpha_new / alpha_old
    truth = {"SGD": c ** 2, "Adam": c}
    sgd, adam = _ex01_pair(answer, "answer_4", "(ratio under SGD, ratio under Adam), e.g. (2, 3)")
    sgd_ok, adam_ok = _ex01_close(sgd, truth["SGD"], 0.05), _ex01_close(adam, truth["Adam"], 0.05)
    if sgd_ok and adam_ok:                   # only now may a message show the measurement
        if measured is not None:
            assert _ex01_close(measured["SGD"], truth["SGD"], 0.01) and _ex01_close(measured["Adam"], truth["Adam"], 0.05), \
                f"the run measured {measured}; one step from B = 0 should give SGD {c ** 2:g}, Adam {c:g}: rerun the experiment cell"
        return ok(f"SGD {c ** 2:g}x, Adam {c:g}x: under SGD α enters twice (in B's gradient and in ΔW = "
                  "(α/r) B A); Adam's step ignores the gradient's size, so only the second factor remains")
    if _ex01_close(sgd, truth["Adam"], 0.05) and _ex01_close(adam, truth["SGD"], 0.05):
        raise AssertionError("swapped: the pair is (SGD, Adam)")
    hints = []
    if not sgd_ok:
        hints.append("SGD: B's first step is -lr x (its gradient), and that gradient contains α/r too; "
                     "ΔW = (α/r) B A then multiplies by α/r again")
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


def ex02_1(answer, layer_shapes, r_new, built=None, all_shapes=None):
    """Ex 1: ELoRA's trainable adapter parameters (d and b, classifier excluded) at rank r_new.
    layer_shapes: [(d_in, d_out)] of the adapted layers (the notebook asks about an asymmetric set,
    intermediate.dense only, so that b sized d_in gives another count); built: the count of a model
    built at r_new; all_shapes: the shapes of the notebook's full target set (for one more hint)."""
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
    if a - truth == _classifier_size(shapes=all_shapes or layer_shapes):
        raise AssertionError("count only the adapters' d and b: the classifier head is trained too, but "
                             "it is not part of the count")
    if a == sum(r_new * (i + o) for i, o in layer_shapes):
        raise AssertionError("that is LoRA's count r (d_in + d_out): ELoRA's A and B are frozen, only the "
                             "vectors d (r numbers) and b (d_out numbers) train")
    if a == sum(r_new + i for i, _ in layer_shapes):
        raise AssertionError("that sizes b by d_in: b scales the layer's outputs, h = W0 x + b ⊙ (...), so it "
                             "has d_out numbers, one per output feature")
    if a == sum(i + o for i, o in layer_shapes):
        raise AssertionError("that sizes d by d_in: d scales the r rows of A x, so it has r numbers, "
                             "one per rank")
    if a == n * r_new:
        raise AssertionError("that counts d only: every layer also trains b, one number per output feature")
    if a == sum(o for _, o in layer_shapes):
        raise AssertionError("that counts b only: every layer also trains d, one number per rank")
    if a == sum(1024 + o for _, o in layer_shapes):
        raise AssertionError(f"that is the count at r = 1024; the question asks for r = {r_new}")
    if all_shapes is not None and len(all_shapes) != n and a == sum(r_new + o for _, o in all_shapes):
        raise AssertionError(f"that counts all {len(all_shapes)} layers of the notebook's target list; the "
                             f"question adapts only these {n}")
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
    if abs(a - (elora_params + _classifier_size(shapes=layer_shapes)) / per_rank) <= 0.005:
        raise AssertionError("that adds the classifier head to ELoRA's count: the classifier head is not "
                             "part of the count, on either side")
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
    try:
        rebuilt = am.ELoRALinear(torch.nn.Linear(layer.in_features, layer.out_features), r=layer.r,
                                 seed=int(answer))
    except ValueError:                  # the library's own range check
        raise AssertionError(f"{answer} is no layer seed: layer_seed keeps 63 bits of a hash, so a layer's "
                             "seed lies in [0, 2**63)") from None
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


def _ex02_crossing(answer, truth: float, name: str):
    """True if the answer is the real crossing point (within 0.5) or one of the two whole numbers on
    either side of it (the last one where the token path wins, the first one where the weight path
    does); else the answer as a float, for the hints."""
    import math
    a = _ex02_number(answer, name)
    last, first = math.floor(truth), math.floor(truth) + 1
    if abs(a - truth) <= 0.5 or a in (last, first):
        return True
    return a


def _ex02_rounded(a: float, truth: float) -> bool:
    """True if a is truth rounded (to nearest, down or up) to 0-3 decimals or to 1-3 significant figures."""
    import math
    steps = [10.0 ** -k for k in range(4)]
    if truth > 0:
        steps += [10.0 ** (math.floor(math.log10(truth)) - k + 1) for k in (1, 2, 3)]
    for step in steps:
        for c in (round(truth / step) * step, math.floor(truth / step) * step, math.ceil(truth / step) * step):
            if c != 0 and abs(a - c) <= 1e-9 * max(1.0, abs(c)):
                return True
    return False


def ex02_4(answer, n_tokens, d_in, d_out):
    """Ex 4: the rank r* at which the weight path and the token path cost the same extra multiply-adds,
    for a (d_in -> d_out) layer and n_tokens tokens, fp32 (ΔW fused into W0). Accepted: r* as a real
    number, or the whole rank on either side of it (the largest at which the token path is still
    cheaper: "above which rank"; the smallest at which the weight path is)."""
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
    a = _ex02_crossing(answer, truth, "answer_4")
    if a is True:
        return ok(f"r* = n in out / (2 n (in + out) - 3 in out) = {truth:.2f}: auto takes the token path "
                  f"up to r = {below} and the weight path from r = {above} on")
    limit = i * o / (2 * (i + o))
    if abs(a - limit) <= 0.5:
        raise AssertionError(f"{limit:.1f} is the limit for very many tokens; at n = {n} the weight path "
                             "also pays 3 out r in to form ΔW and its gradients, which moves r* up")
    if abs(a - 96) <= 0.5 or abs(a - n * 384 * 384 / (2 * n * 768 - 3 * 384 * 384)) <= 0.5:
        raise AssertionError(f"that is the square 384 x 384 layer's value; this layer is {i} -> {o}")
    if abs(a - 3 * truth) <= 1.5:
        raise AssertionError("that counts the ΔW gradient as 3 n in out, the unfused case; in fp32 ΔW is "
                             "folded into W0, and only its gradient g xᵀ (n in out) is extra")
    if 2 * n * (i + o) > 6 * i * o and abs(a - n * i * o / (n * (i + o) - 3 * i * o)) <= 0.5:
        raise AssertionError("the token path costs 2 n r (in + out): A x and B h forward, and their two "
                             "input gradients backward")
    if _ex02_rounded(a, truth):
        raise AssertionError("close, but rounded too far: give r* to one decimal (or the whole rank on "
                             "either side of it)")
    raise AssertionError("the weight path is cheaper when 3 out r in + n in out < 2 n r (in + out); "
                         "solve for r")


def ex02_5(answer, d_in, d_out, r):
    """Ex 5: the token count n* from which on the weight path costs fewer extra multiply-adds than the
    token path, for an ELoRA (d_in -> d_out) layer at rank r, fp32 (ΔW fused into W0). Accepted: n* as
    a real number, or the whole count on either side of it. Returns True only for a right answer (the
    notebook runs its measurement, which would give the answer away, only then)."""
    if unanswered(answer):
        return False
    import torch
    import aflora_min as am
    i, o = d_in, d_out
    den = 2 * r * (i + o) - i * o
    assert den > 0, f"at r = {r} the token path is cheaper for any number of tokens: pick a larger rank"
    truth = 3 * o * r * i / den
    # a second, independent truth: the library's own choice just below and just above n*
    layer = am.ELoRALinear(torch.nn.Linear(i, o), r=r)
    below, above = int(truth), int(truth) + 1
    for n, path in ((below, "token"), (above, "weight")):
        got = layer.choose_path(torch.zeros(n, i))
        assert got == path, f"library disagrees with the formula at n = {n} tokens: {got}"
    a = _ex02_crossing(answer, truth, "answer_5")
    if a is True:
        return ok(f"n* = 3 out r in / (2 r (in + out) - in out) = {truth:.1f}: auto takes the token path up "
                  f"to {below} tokens and the weight path from {above} on")
    sq = 3 * 384 * r * 384 / (2 * r * 768 - 384 * 384)
    if (i, o) != (384, 384) and abs(a - sq) <= 0.5:
        raise AssertionError(f"that is the square 384 x 384 layer's value; this layer is {i} -> {o}")
    if abs(a - 3 * i * o / (2 * (i + o))) <= 0.5:
        raise AssertionError("that leaves out the weight path's per-token term n in out (the gradient of "
                             "ΔW, the sum of g xᵀ over the tokens), or takes r to infinity; at this r, "
                             "keep it: 3 out r in + n in out < 2 n r (in + out)")
    if abs(a - o * r * i / den) <= 0.5:
        raise AssertionError("forming ΔW costs out r in forward and its two factors' gradients 2 out r in "
                             "backward: 3 out r in in all")
    if r * (i + o) > i * o and abs(a - 3 * o * r * i / (r * (i + o) - i * o)) <= 0.5:
        raise AssertionError("the token path costs 2 n r (in + out): A x and B h forward, and their two "
                             "input gradients backward")
    if 2 * r * (i + o) > 3 * i * o and abs(a - 3 * o * r * i / (2 * r * (i + o) - 3 * i * o)) <= 0.5:
        raise AssertionError("that counts the ΔW gradient as 3 n in out, the unfused case; in fp32 ΔW is "
                             "folded into W0, and only its gradient (n in out) is extra")
    if a == r or abs(a - i * o / (2 * (i + o))) <= 0.5 or abs(a - 96) <= 0.5:
        raise AssertionError("that is a rank; the question asks for a number of tokens n at this rank: "
                             "solve 3 out r in + n in out < 2 n r (in + out) for n")
    if _ex02_rounded(a, truth):
        raise AssertionError("close, but rounded too far: give n* to one decimal (or the whole count on "
                             "either side of it)")
    raise AssertionError("the weight path is cheaper when 3 out r in + n in out < 2 n r (in + out); "
                         "solve for n")


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
    step: the independent truth, whose mean is the time average. Accepted: the exact value within
    0.5, or the integer division sum // T (the exact value rounded down)."""
    if unanswered(answer):
        return False
    import math
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
        return total
    if abs(integrate(lambda s, t: t <= s) / T - truth) > 1e-6 * truth:
        raise RuntimeError("freezer.history and the per-step counts disagree: pass the history and the "
                           "hist['trainable'] of the same run")
    if abs(a - truth) <= 0.5 or a == sum(counts) // T:
        return ok(f"{truth:,.1f} trainable adapter parameters on average over the {T} steps: each count "
                  "holds from the step it was recorded at (a matrix frozen at step s takes no update at step s)")
    late = integrate(lambda s, t: t < s)             # each count one step late
    near = lambda x: abs(a - x) <= 0.5 or a == math.floor(x)
    if near(late / T):
        raise AssertionError("one step off: you counted a matrix frozen at step s as trainable at step s "
                             "too. It takes no update at step s, so the count recorded at step s holds "
                             "from step s on")
    if near(sum(c for _, c in history) / len(history)):
        raise AssertionError("that is the plain mean of the history's entries; weight each count by the "
                             "number of steps it holds")
    if near(history[0][1]) or near(history[-1][1]):
        raise AssertionError("that is the count at the start or at the end; the time average lies between")
    for total in (sum(counts), late):
        if near(total):
            raise AssertionError(f"that is the sum over the steps; the average divides it by the number of "
                                 f"steps, T = {T}")
        for other in (T - 1, T + 1):
            if near(total / other):
                raise AssertionError(f"you divided by {other}: the steps are t = 1, ..., T, so divide by T = {T}")
    raise AssertionError(f"not quite: for each step s = 1..{T}, take the count of the last history entry at "
                         "or before s, and average those counts")


_EX03_2_TARGETS = ("query", "intermediate.dense")


def ex03_2(answer, model_ex2):
    """Ex 2: (trainable adapter parameters at the start, once every A and B is frozen) of AFLoRA r=4 on
    `query` and `intermediate.dense` only, with adaptive=True. model_ex2: such a model, built in the
    notebook. The target set is asymmetric (d_in != d_out summed over it), so b sized d_in is caught."""
    if unanswered(answer):
        return False
    import aflora_min as am
    named = list(am.adapter_layers(model_ex2))
    layers = [m for _, m in named]
    if not layers or not all(isinstance(m, am.AFLoRALinear) and m.adaptive for m in layers):
        raise RuntimeError("build the model with add_adapters(..., 'aflora', EX2_TARGETS, adaptive=True)")
    if not all(n.endswith(_EX03_2_TARGETS) for n, _ in named):
        raise RuntimeError(f"build the model with the exercise's targets {list(_EX03_2_TARGETS)} only")
    start = sum(m.r + m.out_features + m.r * m.in_features + m.out_features * m.r for m in layers)
    end = sum(m.r + m.out_features for m in layers)
    built = am.AFLoRAFreezer.trainable_adapter_params(model_ex2)
    if built != start:
        raise RuntimeError(f"the model has {built:,d} trainable adapter parameters, the shapes give {start:,d}: "
                           "pass a freshly built model")
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise AssertionError(f"answer_2 should be a pair (at the start, once frozen), got {answer!r}")
    s, e = _ex03_int(answer[0], "answer_2[0]"), _ex03_int(answer[1], "answer_2[1]")
    if (s, e) == (start, end):
        n_q = sum(m.in_features == m.out_features for m in layers)
        return ok(f"{start:,d} at the start, {end:,d} once frozen: all {len(layers)} layers train A and B until "
                  f"they freeze (the {n_q} square query matrices too, with adaptive=True), d (r) and b (d_out) "
                  f"to the end; {2 * len(layers)} matrices to freeze")
    if (s, e) == (end, start):
        raise AssertionError("swapped: the pair is (at the start, once everything is frozen)")
    b_in_start = sum(m.r + m.in_features + m.r * m.in_features + m.out_features * m.r for m in layers)
    b_in_end = sum(m.r + m.in_features for m in layers)
    if s == b_in_start or e == b_in_end:
        raise AssertionError("b scales the layer's output, Λ_b is d_out x d_out: b has d_out entries, not d_in "
                             "(intermediate.dense maps 384 -> 1536)")
    default_start = sum(m.r + m.out_features + (m.r * (m.in_features + m.out_features)
                                                if m.in_features != m.out_features else 0) for m in layers)
    if s == default_start:
        raise AssertionError("that is the default policy, where a square matrix (query) keeps A and B frozen; "
                             "with adaptive=True its A and B train too")
    head = _classifier_size(model_ex2, [(m.in_features, m.out_features) for m in layers])
    if (s - start, e - end) == (head, head):
        raise AssertionError(f"both numbers are off by the classifier head ({head:,d} parameters, which "
                             "print_trainable_parameters counts too): count the adapters only")
    ffn = [m for n, m in named if n.endswith("intermediate.dense")]
    if ffn and len(ffn) < len(layers) and (s, e) == (
            sum(m.r + m.out_features + m.r * m.in_features + m.out_features * m.r for m in ffn),
            sum(m.r + m.out_features for m in ffn)):
        raise AssertionError("that counts intermediate.dense only: the query layers are adapted too "
                             "(and with adaptive=True their A and B train as well)")
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
        hints.append(f"you left out {len(missing)} decision step{'s' * (len(missing) > 1)} between the warm-up and "
                     f"T - t_f: every multiple of the window {w} after t_i = {ti} where k = int(N (1 - rho)) >= 1 "
                     "is a decision that can freeze")
    raise AssertionError("; ".join(hints) or "not quite")


def ex03_4(answer, freezer_rank):
    """Ex 4 (experiment): a pair ({decision step t: matrices still trainable after the decision at t},
    the step of the first freeze) for a run with rule='rank'. The truth is the run's frozen_at; the run
    must agree with the schedule (the rank rule leaves floor(M rho(t)) of the M matrices trainable)."""
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
    first = min(fz.frozen_at.values())
    rho = {t: am.cubic_schedule(t, T, ti, tf) for t in steps}
    formula = {t: M - math.ceil((1.0 - rho[t]) * M - 1e-9) for t in steps}
    if truth != formula:
        raise RuntimeError(f"the run left {truth} trainable, the schedule says {formula}")
    if isinstance(answer, dict):
        raise AssertionError("answer_4 should be a pair: ({decision step: matrices still trainable after it}, "
                             "the step of the first freeze)")
    if not isinstance(answer, (tuple, list)) or len(answer) != 2 or not isinstance(answer[0], dict):
        raise AssertionError("answer_4 should be a pair ({decision step: matrices still trainable after it}, "
                             f"the step of the first freeze), got {answer!r}")
    counts, first_answer = answer
    a = {_ex03_int(k, "each step (key) in answer_4[0]"): _ex03_int(v, "each count (value) in answer_4[0]")
         for k, v in counts.items()}
    f = _ex03_int(first_answer, "answer_4[1], the step of the first freeze")
    if a != truth:
        if set(a) != set(truth):
            extra, missing = sorted(set(a) - set(truth)), sorted(set(truth) - set(a))
            raise AssertionError(f"the keys should be the decision steps {steps} (every {fz.window} steps after "
                                 f"t_i = {ti}, and T - t_f = {T - tf}); extra: {extra[:6]}, missing: {missing[:6]}")
        if a == {t: M - v for t, v in truth.items()}:
            raise AssertionError("those are the frozen matrices; the question asks how many are still trainable")
        if a == {t: round(M * rho[t]) for t in steps} or a == {t: math.ceil(M * rho[t] - 1e-9) for t in steps}:
            raise AssertionError(f"rounding: the rank rule freezes until the frozen fraction reaches 1 - rho, "
                                 f"rounding the frozen count up, so floor({M} rho(t)) stay trainable")
        wrong = sorted(t for t in steps if a[t] != truth[t])
        raise AssertionError(f"not at steps {wrong[:6]}: after the decision at t, the rank rule leaves "
                             f"{M} - ceil((1 - rho(t)) {M}) matrices trainable")
    if f != first:
        if f <= ti:
            raise AssertionError(f"nothing freezes during the warm-up (t <= t_i = {ti}): the first freeze comes at "
                                 "a decision after it")
        if f not in steps:
            raise AssertionError(f"a matrix can only freeze at a decision step ({steps[:4]} ...): {f} is not one")
        raise AssertionError(f"look at your own counts: the first decision that leaves fewer than {M} matrices "
                             f"trainable is the first freeze, not {f}")
    return ok(f"the rank rule tracks the schedule exactly: floor({M} rho(t)) matrices stay trainable after "
              f"each decision, and the first freeze comes at the first decision after the warm-up, t = {first}, "
              f"where rho already dropped below 1")


# -- Ex 5: the rule, written by the student, replayed against AFLoRAFreezer on toy models
_EX03_5_RUNS = ((0, 60, 6, 18, 3), (1, 60, 12, 18, 3), (2, 80, 20, 20, 4))   # (seed, T, t_init, t_final, window)


def _ex03_5_toy(seed: int):
    """A toy model: eight non-square linears with AFLoRA adapters (16 adaptive matrices of 32 or 64
    elements), and a torch generator for its gradients."""
    import torch
    import torch.nn as nn
    import aflora_min as am
    g = torch.Generator().manual_seed(1000 + seed)
    seq = nn.Sequential(*[nn.Linear(8, 16) if i % 2 == 0 else nn.Linear(16, 8) for i in range(8)])
    model = am.add_adapters(seq, "aflora", [str(i) for i in range(8)], r=4, train=(), seed=seed)
    return model, g


def _ex03_5_replay(fns: dict, seed, T, t_init, t_final, window):
    """Drive AFLoRAFreezer on a toy model with random signed gradients; at every decision (after the warm-up,
    where k = int(N (1 - rho)) >= 1, and at T - t_f) call each fn(window_grads, i_bar, u_bar, rho) on
    copies of what the freezer holds before it closes the window. Returns one dict per decision:
    t, rho, frozen (the freezer's new frozen names), i_bar and u_bar (the freezer's after the window),
    answers ({fn name: what it returned})."""
    import math
    import torch
    import aflora_min as am
    model, g = _ex03_5_toy(seed)
    fz = am.AFLoRAFreezer(model, total_steps=T, t_init=t_init, t_final=t_final, window=window)
    names = list(fz.params)
    # per matrix: a starting scale, a drift over the steps, a step-to-step jitter and an element spread,
    # so that the window means, the running averages and the element quantiles all matter
    draw = lambda: float(torch.randn((), generator=g))
    base = {n: math.exp(0.5 * draw()) for n in names}
    drift = {n: 0.08 * draw() for n in names}
    jitter = {n: 0.1 + 0.6 * abs(draw()) for n in names}
    spread = {n: 0.2 + 0.8 * abs(draw()) for n in names}
    window_grads = {n: [] for n in names}
    out = []
    try:
        for t in range(1, T + 1):
            active = fz.active()
            if not active:
                break
            for n in active:
                p = fz.params[n]
                z = torch.randn(p.shape, generator=g)
                size = base[n] * math.exp(drift[n] * t + jitter[n] * draw())
                p.grad = size * torch.sign(z) * torch.exp(spread[n] * z.abs())
                window_grads[n].append(p.grad.clone())
            rho = am.cubic_schedule(t, T, t_init, t_final)
            closes = t % window == 0 or rho == 0.0
            n_elem = sum(fz.params[n].numel() for n in active)
            decide = closes and t > t_init and (rho == 0.0 or int(n_elem * (1.0 - rho)) >= 1)
            answers = {}
            if decide:
                for key, fn in fns.items():
                    answers[key] = fn({n: [x.clone() for x in window_grads[n]] for n in active},
                                      {n: fz.exp_avg_ipt[n].clone() for n in active},
                                      {n: fz.exp_avg_unc[n].clone() for n in active}, float(rho))
            new = fz.step()
            if closes:
                window_grads = {n: [] for n in names}
            if decide:
                out.append(dict(t=t, rho=float(rho), frozen=set(new), answers=answers,
                                i_bar={n: fz.exp_avg_ipt[n].clone() for n in active},
                                u_bar={n: fz.exp_avg_unc[n].clone() for n in active}))
            for p in fz.params.values():
                p.grad = None
    finally:
        fz.remove()
    return out


def _ex03_5_variant(kind: str):
    """The rule, right ("right") or with one plausible mistake, as a student's function would be."""
    import torch
    b1, b2 = (0.95, 0.85) if kind == "betas swapped" else (0.85, 0.95)

    def fn(window_grads, i_bar, u_bar, rho):
        s, i_new, u_new = {}, {}, {}
        for n, grads in window_grads.items():
            mag = [x if kind == "no abs" else x.abs() for x in grads]
            I = sum(mag) / (1 if kind == "window sum" else len(mag))
            i_new[n] = b1 * i_bar[n] + (1 - b1) * I
            u_new[n] = b2 * u_bar[n] + (1 - b2) * (I - (i_bar[n] if kind == "old i_bar" else i_new[n])).abs()
            s[n] = i_new[n] if kind == "i_bar only" else i_new[n] * u_new[n]
        means = {n: v.mean().item() for n, v in s.items()}
        if kind == "matrix means":
            pooled = torch.tensor(list(means.values()))
        else:
            pooled = torch.cat([v.flatten() for v in s.values()])
        frac = rho if kind == "rho for 1 - rho" else 1.0 - rho
        if kind == "interpolated quantile":
            q = torch.quantile(pooled.double(), frac).item()
        else:
            k = int(pooled.numel() * frac)
            if k < 1:
                return [], i_new, u_new
            q = pooled.kthvalue(k).values.item()
        if kind == "freeze the high":
            return [n for n in s if means[n] > q], i_new, u_new
        if kind == "max element":
            return [n for n in s if s[n].max().item() < q], i_new, u_new
        return [n for n in s if means[n] < q], i_new, u_new
    return fn


_EX03_5_HINTS = {   # closing the window (Ī, Ū) first, then the rule
    "no abs": "the sensitivity is the gradient's magnitude: average |∇| over the window, not the signed ∇",
    "window sum": "I is the window's MEAN of |∇|: divide the window's sum by the number of steps in it",
    "betas swapped": "β1 = 0.85 smooths Ī, β2 = 0.95 smooths Ū: you swapped them",
    "old i_bar": "update Ū with the NEW Ī: Ī <- β1 Ī + (1 - β1) I first, then Ū <- β2 Ū + (1 - β2) |I - Ī|",
    "matrix means": "pool the ELEMENT scores of all still-trainable matrices (N numbers) and take their k-th "
                    "smallest, k = int(N (1 - rho)); you took the quantile of the matrices' mean scores",
    "rho for 1 - rho": "rho is the fraction that may still train, so the threshold is the (1 - rho) quantile: "
                       "k = int(N (1 - rho)), not int(N rho)",
    "freeze the high": "freeze the matrices whose mean score is BELOW q (a low score: the matrix has settled)",
    "i_bar only": "the score is s = Ī ⊙ Ū, the smoothed sensitivity times its uncertainty, not Ī alone",
    "max element": "compare each matrix's MEAN score (over its elements) with q, not its largest element",
}


def _ex03_5_same(a: dict, b: dict) -> bool:
    """Two {name: tensor} dicts hold the same tensors (float32 rounding allowed)."""
    import torch
    if set(a) != set(b):
        return False
    for n in a:
        try:
            x = torch.as_tensor(a[n]).double()
        except (TypeError, ValueError, RuntimeError):
            return False
        if x.shape != b[n].shape or not torch.allclose(x, b[n].double(), rtol=1e-4, atol=1e-30):
            return False
    return True


def ex03_5(answer):
    """Ex 5: answer is a function freeze_now(window_grads, i_bar, u_bar, rho) -> (the names to freeze,
    the new Ī, the new Ū): close one window (I = mean |∇| over it; Ī and Ū updated with β1 = 0.85,
    β2 = 0.95, Ū with the new Ī) and apply the quantile rule. Replayed at every decision of three toy
    runs against AFLoRAFreezer's own Ī, Ū and decisions; a wrong function is matched against the
    plausible mistakes (_EX03_5_HINTS)."""
    if unanswered(answer):
        return False
    if not callable(answer):
        raise AssertionError(f"answer_5 should be a function freeze_now(window_grads, i_bar, u_bar, rho), "
                             f"got {answer!r}")

    def student(window_grads, *args):
        try:
            got = answer(window_grads, *args)
        except Exception as err:
            raise AssertionError(f"your function raised {type(err).__name__}: {err}") from err
        if not isinstance(got, (tuple, list)) or len(got) != 3 or not all(isinstance(x, dict) for x in got[1:]):
            raise AssertionError("freeze_now should return three things: (the names to freeze, the new Ī as "
                                 f"{{name: tensor}}, the new Ū as {{name: tensor}}), got {type(got).__name__}")
        names, i_new, u_new = got
        if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
            raise AssertionError(f"the names to freeze should be a list or set of keys of window_grads, got {names!r}")
        names = set(names)
        if not names <= set(window_grads):
            raise AssertionError(f"freeze_now returned names that are not still-trainable matrices: "
                                 f"{sorted(map(str, names - set(window_grads)))[:3]}")
        return names, i_new, u_new
    fns = {"student": student} | {k: _ex03_5_variant(k) for k in _EX03_5_HINTS}
    decisions = [d for run in _EX03_5_RUNS for d in _ex03_5_replay(fns, *run)]

    def agrees(d, key):     # (Ī and Ū right, decision right) of fn `key` at decision d
        names, i_new, u_new = d["answers"][key]
        return _ex03_5_same(i_new, d["i_bar"]) and _ex03_5_same(u_new, d["u_bar"]), set(names) == d["frozen"]

    def same_as(key):       # the student's function behaves as variant `key` at every decision
        for d in decisions:
            (n1, i1, u1), (n2, i2, u2) = d["answers"]["student"], d["answers"][key]
            if set(n1) != set(n2) or not (_ex03_5_same(i1, i2) and _ex03_5_same(u1, u2)):
                return False
        return True
    scores_wrong = [d for d in decisions if not agrees(d, "student")[0]]
    rule_wrong = [d for d in decisions if not agrees(d, "student")[1]]
    if not scores_wrong and not rule_wrong:
        n_frozen = sum(len(d["frozen"]) for d in decisions)
        return ok(f"the same Ī, Ū and decisions as AFLoRAFreezer at all {len(decisions)} decisions of "
                  f"{len(_EX03_5_RUNS)} toy runs ({n_frozen} freezes): pooled element scores, k = int(N (1 - rho)), "
                  "freeze the matrices whose mean is below the k-th smallest")
    for kind, hint in _EX03_5_HINTS.items():
        if same_as(kind):
            raise AssertionError(hint)
    if scores_wrong:
        d = scores_wrong[0]
        _, i_new, u_new = d["answers"]["student"]
        which = "Ī" if not _ex03_5_same(i_new, d["i_bar"]) else "Ū"
        raise AssertionError(f"closing the window: your {which} differs from the freezer's at step {d['t']} "
                             f"({len(scores_wrong)} of {len(decisions)} decisions); I = mean |∇| over the window, "
                             "Ī <- 0.85 Ī + 0.15 I, Ū <- 0.95 Ū + 0.05 |I - Ī| with the new Ī")
    d = rule_wrong[0]
    got, truth = set(d["answers"]["student"][0]), d["frozen"]
    raise AssertionError(f"your Ī and Ū are right; {len(rule_wrong)} of {len(decisions)} decisions differ, the first "
                         f"at step {d['t']} (rho = {d['rho']:.3f}): the freezer froze {len(truth)} matrices, yours "
                         f"{len(got)}; q is the k-th smallest of the pooled element scores s = Ī ⊙ Ū, "
                         "k = int(N (1 - rho)), and a matrix freezes when its mean score is below q")
