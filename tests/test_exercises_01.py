"""The exercise checks of notebooks/01_lora.ipynb (notebooks/exercises.py, section 01): each accepts
the right answer, treats the placeholder `...` as not answered, and rejects the plausible wrong
answers with an AssertionError. No model is needed: the layer shapes are MiniLM-L6's."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest

import exercises as ex

SQUARE = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
SHAPES = {}                       # MiniLM-L6: 6 blocks, hidden 384, FFN 1536, six adapted linears each
for layer in range(6):
    for kind in SQUARE:
        SHAPES[f"bert.encoder.layer.{layer}.{kind}"] = (384, 384)
    SHAPES[f"bert.encoder.layer.{layer}.intermediate.dense"] = (384, 1536)
    SHAPES[f"bert.encoder.layer.{layer}.output.dense"] = (1536, 384)
FULL_FT = 22_713_986              # count_parameters(MiniLM-L6 with a 2-class head)[0]


def test_shapes_give_the_known_lora_count():
    assert 8 * sum(i + o for i, o in SHAPES.values()) == 331_776


def test_placeholder_is_not_an_error(capsys):
    assert ex.ex01_1(..., SHAPES, 16) is False
    assert ex.ex01_2(..., SHAPES, 8, FULL_FT) is False
    assert ex.ex01_3(..., 8, 8, 16, (8, 32)) is False
    assert ex.ex01_4(..., 8, 32) is False
    assert capsys.readouterr().out.count("not answered yet") == 4


def test_right_answers(capsys):
    assert ex.ex01_1(663_552, SHAPES, 16, built=663_552) is True
    assert ex.ex01_1(np.int64(663_552), SHAPES, 16) is True
    assert ex.ex01_2((73_728, 0.325), SHAPES, 8, FULL_FT, built=73_728) is True
    assert ex.ex01_2([73_728, 100 * 73_728 / FULL_FT], SHAPES, 8, FULL_FT) is True
    assert ex.ex01_3((0.5, 2), 8, 8, 16, (8, 32), measured=(0.5, 2.0)) is True
    assert ex.ex01_3([1 / 2, np.float64(2.0)], 8, 8, 16, (8, 32)) is True
    assert ex.ex01_4((16, 4), 8, 32, measured={"SGD": 15.999, "Adam": 4.009}) is True
    assert ex.ex01_4((16.0, 4.0), 8, 32) is True
    assert capsys.readouterr().out.count("\u2713") == 8


@pytest.mark.parametrize("wrong", [
    331_776,                      # the r = 8 count: rank not changed
    1_327_104,                    # quadratic in r
    663_552 + 770,                # classifier head included
    sum(i * o for i, o in SHAPES.values()),   # full matrices d_in x d_out
    663_551, 600_000,
    "663552", None, True,
])
def test_ex1_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex01_1(wrong, SHAPES, 16)


def test_ex1_rejects_inconsistent_build():
    with pytest.raises(AssertionError):
        ex.ex01_1(663_552, SHAPES, 16, built=331_776)


@pytest.mark.parametrize("wrong", [
    (73_728, 0.00325),            # a fraction: the x100 forgotten
    (73_728, 0.003),              # the same, rounded
    (73_728, 100 * 73_728 / 23_045_762),   # divided by the adapted model's total (0.320)
    (73_728, 100 * 73_728 / (22_713_986 + 73_728)),   # divided by a count that includes the adapters
    (73_728, 0.32),               # two significant figures only
    (73_728, 0.324),              # truncated (or 0.3235, a denominator with the adapters, rounded)
    (73_728, 0.327),              # PEFT's trainable% of the q, v model: head included, over all parameters
    (73_728, 1.46),               # the percentage of all six targets
    (331_776, 1.46),              # all six targets
    (12_288, 0.054),              # one block only
    (1_769_472, 7.79),            # full q, v matrices
    (36_864, 0.162),              # query only
    (73_728, 0.162),
    73_728, 0.325, (73_728,), (73_728, "0.325%"),
])
def test_ex2_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex01_2(wrong, SHAPES, 8, FULL_FT)


@pytest.mark.parametrize("pct", [0.325, 0.3246, 0.32459, 100 * 73_728 / FULL_FT])
def test_ex2_accepts_the_percentage_rounded_to_three_or_more_figures(pct, capsys):
    assert ex.ex01_2((73_728, pct), SHAPES, 8, FULL_FT) is True


@pytest.mark.parametrize("pct", [0.32, 0.3])
def test_ex2_two_figures_get_a_rounding_hint_not_a_denominator_one(pct):
    """0.32 and 0.3 are the right percentage (0.3246) rounded too far."""
    with pytest.raises(AssertionError, match="right up to rounding") as err:
        ex.ex01_2((73_728, pct), SHAPES, 8, FULL_FT)
    assert "divide" not in str(err.value) and "denominator" not in str(err.value)


@pytest.mark.parametrize("pct", [0.33, 0.4])
def test_ex2_too_few_figures_not_the_truth_rounded_are_not_called_right(pct):
    """0.3246 rounds to 0.32 (and 0.3), so 0.33 (0.325 rounded again) and 0.4 are not "right up to rounding"."""
    with pytest.raises(AssertionError, match="not the exact percentage rounded") as err:
        ex.ex01_2((73_728, pct), SHAPES, 8, FULL_FT)
    assert "right up to rounding" not in str(err.value)


def test_ex2_wrong_denominators_are_named():
    with pytest.raises(AssertionError, match="22,787,714"):          # full_ft + the q, v adapters
        ex.ex01_2((73_728, 100 * 73_728 / (FULL_FT + 73_728)), SHAPES, 8, FULL_FT)
    with pytest.raises(AssertionError, match="23,045,762"):          # the all-six model's total
        ex.ex01_2((73_728, 0.3199), SHAPES, 8, FULL_FT)
    with pytest.raises(AssertionError, match="truncated"):           # 0.3246 truncated, or 0.3235 rounded
        ex.ex01_2((73_728, 0.324), SHAPES, 8, FULL_FT)


@pytest.mark.parametrize("wrong", [
    (1, 4),                       # α's ratio alone, α_new / α_old: r changed too
    (2, 8),                       # r's ratio multiplied instead of divided
    (2, 0.5),                     # swapped
    (0.25, 4), (1, 1), (0.5, 4), (1, 2), (4, 4),
    0.5, 2, (0.5,), (0.5, 2, 4), ("0.5", 2), None,
])
def test_ex3_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex01_3(wrong, 8, 8, 16, (8, 32))


def test_ex3_naive_alpha_ratio_fails_with_a_hint_on_r():
    """The old Ex3 (same r, α 8 -> 32) was passed by α_new / α_old; now r changes, and that ratio fails."""
    with pytest.raises(AssertionError, match=r"α's ratio alone.*r went from 8 to 16"):
        ex.ex01_3((8 / 8, 32 / 8), 8, 8, 16, (8, 32))
    with pytest.raises(AssertionError, match="upside down in r"):
        ex.ex01_3((2, 8), 8, 8, 16, (8, 32))


def test_ex3_swapped_and_inverted_pair_names_both():
    """(2, 0.5) is the right pair swapped and also each factor inverted (ΔW_old / ΔW_new)."""
    with pytest.raises(AssertionError, match=r"swapped or inverted.*ΔW\(new\) / ΔW\(trained\)"):
        ex.ex01_3((2, 0.5), 8, 8, 16, (8, 32))


def test_ex3_unchanged_factors_get_the_alpha_over_r_hint():
    """(1, 1): "B A is unchanged, so ΔW is too"; not the α-ratio hint (8 / 8 = 1 matches that first)."""
    with pytest.raises(AssertionError, match="B A is unchanged, but α/r is not: r doubled") as err:
        ex.ex01_3((1, 1), 8, 8, 16, (8, 32))
    assert "α's ratio alone" not in str(err.value)


def test_ex1_classifier_hint_only_for_the_head_size():
    with pytest.raises(AssertionError, match="classifier head"):
        ex.ex01_1(663_552 + 770, SHAPES, 16)          # Linear(384, 2): 384 x 2 + 2
    for wrong in (663_552 + 1, 663_552 + 100, 663_552 + 9_999):
        with pytest.raises(AssertionError, match="not quite") as err:
            ex.ex01_1(wrong, SHAPES, 16)
        assert "classifier" not in str(err.value)


def test_ex3_rejects_layers_that_do_not_keep_BA():
    with pytest.raises(AssertionError, match="keep B A"):
        ex.ex01_3((0.5, 2), 8, 8, 16, (8, 32), measured=(1.0, 4.0))


@pytest.mark.parametrize("wrong", [
    (4, 4),                       # SGD thought to scale like ΔW only
    (16, 16),                     # Adam thought to follow the gradient's size
    (4, 1), (16, 1), (1, 1),      # Adam thought to cancel α
    (4, 16),                      # swapped
    (256, 16), (16, 2),
    16, (16,), {"SGD": 16, "Adam": 4},
])
def test_ex4_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex01_4(wrong, 8, 32)


def test_ex4_rejects_a_run_that_contradicts_the_math():
    with pytest.raises(AssertionError):
        ex.ex01_4((16, 4), 8, 32, measured={"SGD": 4.0, "Adam": 4.0})


def test_ex4_a_wrong_answer_gets_its_hint_before_the_run_is_judged():
    """The run's consistency message states the true ratios, so a wrong answer must not reach it."""
    with pytest.raises(AssertionError, match="Adam: its first step") as err:
        ex.ex01_4((16, 16), 8, 32, measured={"SGD": 4.0, "Adam": 4.0})
    assert "should give" not in str(err.value)


# ---------------------------------------------------------------- the notebook around the checks
NB = Path(__file__).resolve().parents[1] / "notebooks" / "01_lora.ipynb"


def _cells():
    return json.loads(NB.read_text(encoding="utf-8"))["cells"]


def test_notebook_01_experiment_is_revealed_only_by_a_passed_check():
    """Ex4 is "predict, then run": the experiment cell prints and plots nothing at top level; the
    reveal is called only inside `if exercises.ex01_4(...)`, which is True only for a right answer."""
    cells = [c for c in _cells() if c["cell_type"] == "code"]
    exp = next(c for c in cells if "def delta_w_norms" in "".join(c["source"]))
    tree = ast.parse("".join(exp["source"]))
    for node in tree.body:                 # top-level statements: definitions and assignments only
        assert isinstance(node, (ast.Assign, ast.FunctionDef)), ast.dump(node)[:80]
    assert not exp["outputs"], "the stored outputs of the experiment cell would reveal the answer"
    check = next(c for c in cells if "exercises.ex01_4(" in "".join(c["source"]))
    (stmt,) = ast.parse("".join(check["source"])).body
    assert isinstance(stmt, ast.If) and "ex01_4" in ast.unparse(stmt.test)
    assert "show_alpha_experiment" in ast.unparse(stmt.body[0])


def test_notebook_01_uses_the_nbval_tag_not_the_comment():
    cells = [c for c in _cells() if c["cell_type"] == "code"]
    assert not [c["id"] for c in cells if "NBVAL_IGNORE_OUTPUT" in "".join(c["source"])]
    assert sum("nbval-ignore-output" in c["metadata"].get("tags", []) for c in cells) >= 3
