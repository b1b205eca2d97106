"""The exercise checks of notebooks/01_lora.ipynb (notebooks/exercises.py, section 01): each accepts
the right answer, treats the placeholder `...` as not answered, and rejects the plausible wrong
answers with an AssertionError. No model is needed: the layer shapes are MiniLM-L6's."""
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
    assert ex.ex01_3(..., 8, 8, 32) is False
    assert ex.ex01_4(..., 8, 32) is False
    assert capsys.readouterr().out.count("not answered yet") == 4


def test_right_answers(capsys):
    assert ex.ex01_1(663_552, SHAPES, 16, built=663_552) is True
    assert ex.ex01_1(np.int64(663_552), SHAPES, 16) is True
    assert ex.ex01_2((73_728, 0.325), SHAPES, 8, FULL_FT, built=73_728) is True
    assert ex.ex01_2([73_728, 100 * 73_728 / FULL_FT], SHAPES, 8, FULL_FT) is True
    assert ex.ex01_3(4, 8, 8, 32, measured=4.0) is True
    assert ex.ex01_3(4.0, 8, 8, 32) is True
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
    (73_728, 0.32),               # too coarse / wrong denominator
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


@pytest.mark.parametrize("wrong", [32, 1, 0.25, 16, 24, 8, "4x", 3.9])
def test_ex3_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex01_3(wrong, 8, 8, 32)


def test_ex3_rejects_layers_that_do_not_share_A_B():
    with pytest.raises(AssertionError):
        ex.ex01_3(4, 8, 8, 32, measured=3.2)


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
