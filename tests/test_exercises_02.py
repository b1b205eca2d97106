"""The exercise checks of notebooks/02_elora.ipynb (notebooks/exercises.py, section 02): each accepts
the right answer, treats the placeholder `...` as not answered, and rejects the plausible wrong
answers with an AssertionError. No pretrained model is needed: the layer shapes are MiniLM-L6's."""
import numpy as np
import pytest
import torch

import aflora_min as am
import exercises as ex

SHAPES = ([(384, 384)] * 4 + [(384, 1536), (1536, 384)]) * 6   # MiniLM-L6's six adapted linears x 6
ELORA_1024 = 57_600
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
    assert ex.ex02_5(..., 12, SHAPES, 1024, ["token"] * len(SHAPES)) is False
    assert capsys.readouterr().out.count("not answered yet") == 5


def test_right_answers(capsys):
    assert ex.ex02_1(29_952, SHAPES, 256, built=29_952) is True
    assert ex.ex02_1(np.int64(29_952), SHAPES, 256) is True
    assert ex.ex02_2(ELORA_1024 / 41_472, ELORA_1024, SHAPES) is True
    assert ex.ex02_2(1.39, ELORA_1024, SHAPES) is True
    assert ex.ex02_2(1.4, ELORA_1024, SHAPES) is True
    assert ex.ex02_3(am.layer_seed(0, NAME), small_layer(), 0, NAME) is True
    assert ex.ex02_3(am.layer_seed(5, NAME), small_layer(5), 5, NAME) is True
    assert ex.ex02_4(4096 * 384 * 1536 / (2 * 4096 * 1920 - 3 * 384 * 1536), 4096, 384, 1536) is True
    assert ex.ex02_4(173, 4096, 384, 1536) is True
    assert ex.ex02_5("token", 12, SHAPES, 1024, ["token"] * len(SHAPES)) is True
    assert ex.ex02_5(" Token ", 12, SHAPES, 1024, ["token"] * len(SHAPES)) is True
    assert capsys.readouterr().out.count("\u2713") == 11


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


@pytest.mark.parametrize("wrong", ["weight", "auto", "", None, 1])
def test_ex5_rejects(wrong):
    with pytest.raises(AssertionError):
        ex.ex02_5(wrong, 12, SHAPES, 1024, ["token"] * len(SHAPES))


def test_ex5_many_tokens_is_the_weight_path():
    assert ex.ex02_5("weight", 4096, SHAPES, 1024, ["weight"] * len(SHAPES)) is True
    with pytest.raises(AssertionError):
        ex.ex02_5("token", 4096, SHAPES, 1024, ["weight"] * len(SHAPES))


def test_ex5_refuses_a_library_that_disagrees():
    with pytest.raises(AssertionError):
        ex.ex02_5("token", 12, SHAPES, 1024, ["weight"] * len(SHAPES))
