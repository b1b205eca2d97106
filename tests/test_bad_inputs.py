"""The bad-input catalogue: each row does one bad thing and gets a clear error or warning (or, where
the input is legitimate but delicate, no message and the documented behaviour), and nothing the row
did not mean to touch is corrupted: every model's parameters, requires_grad flags and module types,
and the freezer's state, are compared with a snapshot taken before the row ran."""
import math
import pickle
import re
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import aflora_min as am


class Net(nn.Module):
    """Non-square (up, down: adaptive under AFLoRA) and square (mid) Linears, a non-Linear, a head."""

    def __init__(self):
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.act = nn.ReLU()
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(self.down(self.act(self.mid(self.act(self.up(x))))))


class NotATensor:  # something torch.load(weights_only=True) must refuse to unpickle
    pass


TARGETS = ["up", "mid", "down"]


def aflora(seed=0, r=2, **options):
    torch.manual_seed(0)
    model = am.add_adapters(Net(), "aflora", TARGETS, r=r, seed=seed, **options)
    with torch.no_grad():
        for _, layer in am.adapter_layers(model):
            layer.lora_b.normal_()  # b = 0 at init would make ΔW = 0 and hide merge errors
    return model


def freezer_for(model, **kw):
    kw = {"total_steps": 20, "t_init": 2, "t_final": 5, "window": 2, **kw}
    return am.AFLoRAFreezer(model, **kw)


def backward(ctx, model=None):
    (model or ctx.model)(ctx.x).square().mean().backward()


def make_ctx(tmp_path):
    torch.manual_seed(0)
    ctx = types.SimpleNamespace(tmp=tmp_path, x=torch.randn(4, 8))
    ctx.plain = Net()
    ctx.model = aflora()
    ctx.opt = torch.optim.AdamW([p for p in ctx.model.parameters() if p.requires_grad], lr=1e-2)
    ctx.freezer = freezer_for(ctx.model, optimizer=ctx.opt)
    torch.manual_seed(1)
    ctx.lora = am.add_adapters(Net(), "lora", ["up"], r=2)
    return ctx


# ---------------------------------------------------------------------------------------------
# Snapshots: what "nothing was corrupted" means


def snapshot(ctx):
    snap = {}
    for key in ("plain", "model", "lora"):
        m = getattr(ctx, key)
        snap[key] = ([(n, p.detach().clone(), p.requires_grad) for n, p in m.named_parameters()],
                     [(n, type(mod).__name__) for n, mod in m.named_modules()], len(m._forward_pre_hooks))
    snap["freezer"] = ctx.freezer.state_dict()
    return snap


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# Actions that need more than one line


def nan_step(ctx, value=math.nan):
    """A window of two steps whose second gradient holds one NaN (or inf) per matrix."""
    f = ctx.freezer
    for step in range(f.window):
        backward(ctx)
        if step == f.window - 1:
            for p in f.params.values():
                p.grad[0, 0] = value
        out = f.step()
        ctx.model.zero_grad()
    return out


def inf_at_decision_step(ctx):
    """A freezer that decides at every step from step 1 on, fed an inf gradient: it must not decide."""
    model = aflora()
    ctx.f = freezer_for(model, total_steps=10, t_init=0, t_final=2, window=1)
    return nan_step(types.SimpleNamespace(model=model, x=ctx.x, freezer=ctx.f), math.inf)


def frozen_outside_the_freezer(ctx):
    """A matrix frozen by hand (or by loading a mid-run adapter state without the freezer's state)."""
    model = aflora()
    model.up.lora_A.requires_grad_(False)
    f = freezer_for(model)
    backward(types.SimpleNamespace(model=model, x=ctx.x))
    f.step()


def check_only_adapters_train(model):
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(".lora_" in n for n in trains), trains


def check_inf(ctx, out):
    assert out == [] and ctx.f.frozen_at == {} and all(p.requires_grad for p in ctx.f.params.values())


def check_nan(ctx, out):
    """The window was dropped: no score, Ī and Ū untouched, nothing frozen."""
    f = ctx.freezer
    assert out == [] and f.frozen_at == {} and f.step_count == f.window and f.ipt_n == 0
    assert all(not t.any() for key in ("ipt_sum", "exp_avg_ipt", "exp_avg_unc") for t in getattr(f, key).values())
    assert not any(f.score_history.values())
    assert all(p.requires_grad for p in f.params.values())


def bf16_base(ctx):
    torch.manual_seed(0)
    model = am.add_adapters(Net().to(torch.bfloat16), "aflora", TARGETS, r=2)
    layer = model.up
    with torch.no_grad():
        layer.lora_b.normal_()
    w0 = layer.base_layer.weight.detach().clone()
    y = model(ctx.x.to(torch.bfloat16))
    am.merge_adapters(model)
    return layer, w0, y


def check_bf16(ctx, out):
    layer, w0, y = out
    assert layer.lora_A.dtype == layer.lora_b.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert layer.delta_weight().dtype == torch.float32
    assert torch.equal(layer.base_layer.weight, (w0.float() + layer.delta_weight()).to(torch.bfloat16))


def merge_layer_twice(ctx):
    ctx.expected = ctx.model.up.base_layer.weight.float() + ctx.model.up.delta_weight()
    ctx.model.up.merge()
    ctx.model.up.merge()


def check_merged_once(ctx, out):
    assert torch.equal(ctx.model.up.base_layer.weight, ctx.expected)
    ctx.model.up.unmerge()


def merge_model_twice(ctx):
    am.merge_adapters(ctx.model)
    ctx.expected = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    am.merge_adapters(ctx.model)


def check_merge_idempotent(ctx, out):
    assert all(torch.equal(p, ctx.expected[n]) for n, p in ctx.model.named_parameters())
    am.unmerge_adapters(ctx.model)


def export_merged(ctx):
    am.merge_adapters(ctx.model)
    merged = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    try:
        am.export_lora(ctx.model, ctx.tmp / "export")
    finally:  # nothing written, the merged model unchanged
        assert not (ctx.tmp / "export").exists()
        assert all(torch.equal(p, merged[n]) for n, p in ctx.model.named_parameters())


def step_after_all_frozen(ctx):
    model = aflora()
    f = freezer_for(model)
    for n in f.params:
        f.freeze(n)
    backward(ctx, model)
    ctx.before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx.other = model
    return f.step()


def check_all_frozen(ctx, out):
    assert out == [] and all(torch.equal(p, ctx.before[n]) for n, p in ctx.other.named_parameters())


def step_twice(ctx):
    backward(ctx)
    ctx.freezer.step()
    ctx.after_one = ctx.freezer.state_dict()
    ctx.freezer.step()


def check_one_step(ctx, out):
    assert same(ctx.freezer.state_dict(), ctx.after_one) and ctx.freezer.step_count == 1


def step_past_total(ctx):
    model = aflora()
    f = freezer_for(model, total_steps=4, t_init=0, t_final=1, window=1)
    for _ in range(4):
        backward(ctx, model)
        f.step()
        model.zero_grad()
    ctx.before = f.state_dict()
    backward(ctx, model)
    ctx.f = f
    return f.step()


def check_past_total(ctx, out):
    assert out == [] and same(ctx.f.state_dict(), ctx.before)


def other_state(**kw):
    return am.adapter_state_dict(aflora(**kw))


def ddp_prefixed_state(ctx):
    return {f"module.{k}": v for k, v in am.adapter_state_dict(ctx.model).items()}


def freezer_state_of_other_model(ctx):
    ctx.freezer.load_state_dict(freezer_for(aflora(r=3)).state_dict())


def checkpoint_of_another_rank(ctx):
    path = ctx.tmp / "c.pt"
    am.save_checkpoint(path, ctx.model, ctx.opt, freezer=ctx.freezer)
    state = torch.load(path, weights_only=True)
    state["rank"], state["world_size"] = 1, 2
    torch.save(state, path)
    ctx.rng = torch.get_rng_state()
    am.load_checkpoint(path, ctx.model, ctx.opt, freezer=ctx.freezer)


def check_rng_untouched(ctx, out):
    assert torch.equal(torch.get_rng_state(), ctx.rng)


def checkpoint_with_object(ctx):
    torch.save({"format": "aflora_min.checkpoint.v1", "payload": NotATensor()}, ctx.tmp / "evil.pt")
    am.load_checkpoint(ctx.tmp / "evil.pt", ctx.model)


def checkpoint_for_other_optimizer(ctx):
    """Saved from a model in another state; loaded with an optimizer built after a freeze (fewer
    parameters). The error must come before the adapter weights are copied."""
    other = aflora()
    with torch.no_grad():
        other.up.lora_d.add_(1.0)
    am.save_checkpoint(ctx.tmp / "c.pt", other, torch.optim.AdamW([p for p in other.parameters() if p.requires_grad]))
    fewer = torch.optim.AdamW([p for n, p in ctx.model.named_parameters() if p.requires_grad and n != "up.lora_A"])
    am.load_checkpoint(ctx.tmp / "c.pt", ctx.model, fewer)


def export_top_level_parameter(ctx):
    model = aflora()
    model.temperature = nn.Parameter(torch.ones(1))  # trained, but on the model itself, not a submodule
    am.export_lora(model, ctx.tmp / "e")


def not_a_checkpoint(ctx):
    torch.save(am.adapter_state_dict(ctx.model), ctx.tmp / "adapter.pt")
    am.load_checkpoint(ctx.tmp / "adapter.pt", ctx.model)


def load_into_merged(ctx):
    am.merge_adapters(ctx.lora)
    try:
        am.load_adapter_state_dict(ctx.lora, am.adapter_state_dict(ctx.lora))
    finally:
        am.unmerge_adapters(ctx.lora)


def disable_merged(ctx):
    am.merge_adapters(ctx.lora)
    try:
        with am.disable_adapters(ctx.lora):
            pass
    finally:
        am.unmerge_adapters(ctx.lora)


# ---------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    id: str
    action: Callable[[Any], Any]
    expect: type | None      # exception type, warning category, or None: no error and no warning
    match: str = ""         # a substring of the message
    changes: tuple = ()      # snapshot entries the row is allowed to change (then `check` says how)
    check: Callable[[Any, Any], None] | None = None
    note: str = "nothing changed"  # what the README says happens to the model / freezer


ROWS = [
    Row("unknown method", lambda c: am.add_adapters(c.plain, "dora", TARGETS), ValueError, "unknown method 'dora'"),
    Row("r <= 0", lambda c: am.add_adapters(c.plain, "lora", TARGETS, r=0), ValueError, "positive integer"),
    Row("r not an int", lambda c: am.add_adapters(c.plain, "aflora", TARGETS, r=4.0), ValueError, "positive integer"),
    Row("no target given", lambda c: am.add_adapters(c.plain, "lora", []), ValueError, "targets is empty"),
    Row("no module matches the targets", lambda c: am.add_adapters(c.plain, "lora", ["query"]), ValueError,
        "no module matches"),
    Row("target is not an nn.Linear", lambda c: am.add_adapters(c.plain, "lora", ["act"]), ValueError,
        "must name nn.Linear"),
    Row("run seed not an integer", lambda c: am.add_adapters(c.plain, "elora", TARGETS, seed=1.5), ValueError,
        "seed must be an integer"),
    Row("projection seed outside [0, 2**63)", lambda c: am.ELoRALinear(nn.Linear(4, 4), r=2, seed=2 ** 64),
        ValueError, "seed must be an integer in [0, 2**63)"),
    Row("adapters added twice", lambda c: am.add_adapters(c.model, "aflora", TARGETS), ValueError, "added twice"),
    Row("adapter built on an adapter", lambda c: am.LoRALinear(c.lora.up), ValueError, "added twice"),
    Row("misspelt option", lambda c: am.add_adapters(c.plain, "lora", TARGETS, alpah=16), TypeError, "alpah",
        note="nothing changed: options are checked before any layer is touched"),
    Row("LoRA alpha = 0", lambda c: am.add_adapters(c.plain, "lora", TARGETS, alpha=0), ValueError,
        "alpha must be positive", note="nothing changed: options are checked before any layer is touched"),
    Row("target inside nn.MultiheadAttention",
        lambda c: am.add_adapters(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), "lora", ["out_proj"]),
        ValueError, "nn.MultiheadAttention"),
    Row("train=None", lambda c: c.__setattr__("plain_none", am.add_adapters(Net(), "lora", TARGETS, train=None)),
        None, check=lambda c, _: check_only_adapters_train(c.plain_none), note="adapters added; only they train"),
    Row("LoRA dropout outside [0, 1)", lambda c: am.add_adapters(c.plain, "lora", TARGETS, dropout=1.0), ValueError,
        "dropout", note="nothing changed: options are checked before any layer is touched"),
    Row("train entry matches nothing", lambda c: am.add_adapters(Net(), "lora", TARGETS, train=("clasifier",)),
        UserWarning, "match no parameter", note="adapters added; nothing extra trains"),
    Row("t_init + t_final >= total_steps", lambda c: freezer_for(c.model, total_steps=10, t_init=5, t_final=5),
        ValueError, "t_init + t_final < total_steps"),
    Row("beta1 = 1", lambda c: freezer_for(c.model, beta1=1.0), ValueError, "beta1 must be in [0, 1)"),
    Row("beta2 < 0", lambda c: freezer_for(c.model, beta2=-0.1), ValueError, "beta2 must be in [0, 1)"),
    Row("window = 0", lambda c: freezer_for(c.model, window=0), ValueError, "window"),
    Row("unknown freezing rule", lambda c: freezer_for(c.model, rule="median"), ValueError, "rule"),
    Row("freezer on a model with no AFLoRA layer", lambda c: freezer_for(c.lora), ValueError,
        "no adaptive AFLoRA layer"),
    Row("freezer built before add_adapters", lambda c: freezer_for(c.plain), ValueError, "call add_adapters"),
    Row("matrix frozen outside the freezer", frozen_outside_the_freezer, ValueError, "this freezer never froze it"),
    Row("freezer.step() before any backward", lambda c: c.freezer.step(), ValueError, "has no gradient"),
    Row("NaN gradient", nan_step, UserWarning, "non-finite gradient", ("freezer", "model"), check_nan,
        note="the window is dropped: no score update, no freeze decision"),
    Row("inf gradient on a decision step", inf_at_decision_step, UserWarning, "non-finite gradient",
        check=check_inf, note="no freeze decision on that step"),
    Row("freezer.step() twice after one backward", step_twice, RuntimeError, "called twice without a backward",
        changes=("freezer",), check=check_one_step, note="the second call changes nothing"),
    Row("total_steps not an integer", lambda c: freezer_for(c.model, total_steps=40.5), TypeError,
        "must be an integer number of optimizer steps"),
    Row("optimizer without the adaptive matrices",
        lambda c: freezer_for(c.model, optimizer=torch.optim.AdamW([c.model.up.lora_d])), ValueError,
        "holds none of the adaptive AFLoRA matrices"),
    Row("freezer.step() after every matrix froze", step_after_all_frozen, None, check=check_all_frozen,
        note="returns []; counts the step, nothing else"),
    Row("freezer.step() past total_steps", step_past_total, UserWarning, "past total_steps",
        check=check_past_total, note="does nothing (warns once)"),
    Row("adapter state whose shapes don't fit", lambda c: am.load_adapter_state_dict(c.model, other_state(r=3)),
        ValueError, "shape"),
    Row("adapter state of another model", lambda c: am.load_adapter_state_dict(c.model, am.adapter_state_dict(c.lora)),
        ValueError, "does not fit"),
    Row("adapter state with other projection seeds", lambda c: am.load_adapter_state_dict(c.model, other_state(seed=5)),
        ValueError, "seed"),
    Row("adapter state saved from the DDP wrapper", lambda c: am.load_adapter_state_dict(c.model, ddp_prefixed_state(c)),
        ValueError, "module.up.lora_A: unexpected"),
    Row("freezer state of another model", freezer_state_of_other_model, ValueError, "shape"),
    Row("checkpoint saved by another rank", checkpoint_of_another_rank, UserWarning, "RNG states NOT restored",
        check=check_rng_untouched, note="adapters, optimizer and freezer restored; RNG states not"),
    Row("checkpoint holding a pickled object", checkpoint_with_object, pickle.UnpicklingError, "Weights only load",
        note="nothing unpickled, nothing changed"),
    Row("checkpoint for another optimizer", checkpoint_for_other_optimizer, ValueError, "parameter groups",
        note="nothing changed: checked before the adapter weights are copied"),
    Row("not a checkpoint", not_a_checkpoint, ValueError, "not an aflora_min checkpoint"),
    Row("checkpoint extra that is not plain data",
        lambda c: am.save_checkpoint(c.tmp / "c.pt", c.model, note=NotATensor()), TypeError, "weights_only",
        note="no file written"),
    Row("bf16 base model", bf16_base, None, check=check_bf16,
        note="adapters stay fp32; ΔW and merge computed in fp32, cast to bf16 once"),
    Row("merging a layer twice", merge_layer_twice, UserWarning, "already merged", changes=("model",),
        check=check_merged_once, note="the second merge does nothing"),
    Row("merge_adapters twice", merge_model_twice, None, changes=("model",), check=check_merge_idempotent,
        note="idempotent: merged once"),
    Row("unmerge without merge", lambda c: c.model.up.unmerge(), UserWarning, "not merged", note="does nothing"),
    Row("loading into a merged model", load_into_merged, ValueError, "merged"),
    Row("disabling merged adapters", disable_merged, ValueError, "merged"),
    Row("export of a merged model", export_merged, ValueError, "unmerge_adapters", changes=("model",),
        note="nothing written; the model stays merged and unchanged"),
    Row("export of a model without adapters", lambda c: am.export_lora(c.plain, c.tmp / "e"), ValueError,
        "no adapter layers"),
    Row("export of a parameter outside any submodule", export_top_level_parameter, ValueError,
        "cannot be exported as a PEFT module to save"),
    Row("rewrap_ddp on a model without DDP", lambda c: am.rewrap_ddp(c.model), TypeError, "DistributedDataParallel"),
]


def test_the_table_has_at_least_15_rows_with_unique_ids():
    assert len(ROWS) >= 15 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, tmp_path):
    ctx = make_ctx(tmp_path)
    before = snapshot(ctx)
    out = None
    if row.expect is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = row.action(ctx)
    elif issubclass(row.expect, Warning):
        with pytest.warns(row.expect, match=re.escape(row.match)):
            out = row.action(ctx)
    else:
        with pytest.raises(row.expect, match=re.escape(row.match)):
            row.action(ctx)
    if row.check is not None:
        row.check(ctx, out)
    after = snapshot(ctx)
    for key in before:
        if key not in row.changes:
            assert same(before[key], after[key]), f"{row.id}: {key} changed"


def markdown():
    """The README's table, generated from ROWS: `PYTHONPATH=. python tests/test_bad_inputs.py` prints it."""
    lines = ["| bad input or fault | what you get (the message contains) | afterwards |", "|---|---|---|"]
    for r in ROWS:
        got = "no error, no warning" if r.expect is None else f"`{r.expect.__name__}`: \"{r.match}\""
        lines.append(f"| {r.id} | {got} | {r.note} |")
    return "\n".join(lines) + "\n"


def test_readme_lists_every_row():
    """The README carries the table and it does not drift from ROWS."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "| bad input or fault |" in text, "README lost its bad-input table"
    assert [r.id for r in ROWS if f"| {r.id} |" not in text] == []


if __name__ == "__main__":
    print(markdown())
