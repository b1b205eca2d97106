"""ELoRA's two exact computations (issue: ELoRA at large rank in weight space), PEFT-style tables:
(model, rank) x property. The token path sends every token through A and B; the weight path forms
ΔW once and does one matmul with W0 + ΔW. Same outputs, same gradients; "auto" picks by cost."""
import copy

import pytest
import torch
import torch.nn as nn

import aflora_min as am
from test_core import MODELS, randomize

# ranks below and above the toy's widths (12, 24) and the tiny BERT's (32, 64)
RANKS = {"toy": (4, 96), "bert": (8, 256)}
CASES = [(m, r) for m in MODELS for r in RANKS[m]]


def build_pair(model_name, r, method="elora", **options):
    """Two copies of one adapted model (the same weights), one per path, with a trained-looking
    adapter (d, b non-zero) and an input that requires grad (toy) so its gradient is compared too."""
    make, targets, make_x = MODELS[model_name]
    model = am.add_adapters(make(), method, targets, r=r, **options)
    randomize(model, trainable_only=True)
    models = {}
    for path in ("token", "weight"):
        models[path] = copy.deepcopy(model)
        for _, layer in am.adapter_layers(models[path]):
            layer.path = path
    return models, make_x()


def run(model, x):
    """Output, and the gradients of every trainable parameter and of a float input."""
    model.zero_grad(set_to_none=True)
    if isinstance(x, dict):
        out = model(**x).logits
    else:
        x = x.clone().requires_grad_(True)
        out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if not isinstance(x, dict):
        grads["input"] = x.grad.clone()
    return out.detach(), grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("model_name,r", CASES)
def test_both_paths_give_the_same_outputs_and_gradients(model_name, r):
    models, x = build_pair(model_name, r)
    (y_t, g_t), (y_w, g_w) = run(models["token"], x), run(models["weight"], x)
    assert rel(y_w, y_t) <= 1e-5
    assert g_t.keys() == g_w.keys()
    assert any(k.endswith("lora_d") for k in g_t) and any("classifier" in k for k in g_t)
    for k in g_t:
        assert rel(g_w[k], g_t[k]) <= 1e-5, k


@pytest.mark.parametrize("model_name,r", CASES)
def test_path_does_not_change_merge_save_or_export(model_name, r, tmp_path):
    models, x = build_pair(model_name, r)
    states = [am.adapter_state_dict(models[p]) for p in ("token", "weight")]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    for path, model in models.items():
        model.eval()
        before = run(model, x)[0]
        am.merge_adapters(model)
        merged = run(model, x)[0]
        am.unmerge_adapters(model)
        assert rel(merged, before) <= 1e-5, path
    deltas = [[layer.delta_weight() for _, layer in am.adapter_layers(models[p])] for p in ("token", "weight")]
    assert all(torch.equal(a, b) for a, b in zip(*deltas))
    fresh = build_pair(model_name, r)[0]["token"]
    am.load_adapter_state_dict(fresh, states[1])          # a weight-path file loads anywhere
    assert rel(run(fresh, x)[0], run(models["token"], x)[0]) <= 1e-6


def cost(layer, n, fused=True):
    i, o, r = layer.in_features, layer.out_features, layer.r
    return 2 * n * r * (i + o), 3 * o * r * i + (1 if fused else 3) * n * i * o


@pytest.mark.parametrize("shape,r", [((384, 384), 1024), ((384, 1536), 1024), ((1536, 384), 1024),
                                     ((384, 384), 64), ((384, 1536), 256)])
def test_auto_flips_where_the_cost_formula_says(shape, r):
    layer = am.ELoRALinear(nn.Linear(*shape), r=r)
    assert layer.path == "auto"
    flips = []
    for n in range(1, 5000, 7):
        token, weight = cost(layer, n)
        want = "weight" if weight < token else "token"
        assert layer.choose_path(torch.zeros(n, shape[0])) == want, n
        flips.append(want)
    # many tokens make the weight path pay once r > in out / (2 (in + out)), never below
    big = layer.in_features * layer.out_features / (2 * (layer.in_features + layer.out_features))
    assert (flips[-1] == "weight") == (r > big * 1.1)
    assert flips[0] == "token"                                      # one token: never worth forming ΔW
    assert layer.choose_path(torch.zeros(3, 5, shape[0])) == layer.choose_path(torch.zeros(15, shape[0]))


def test_auto_keeps_the_token_path_while_projections_train_unless_forced():
    layer = am.AFLoRALinear(nn.Linear(64, 256), r=1024, adaptive=True)
    x = torch.randn(4096, 64)
    assert layer.choose_path(x) == "token"                          # A, B still train
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    assert layer.choose_path(x) == "weight"                         # frozen: cheaper in weight space
    layer.lora_A.requires_grad_(True)
    layer.path = "weight"
    assert layer.choose_path(x) == "weight"                         # forced
    with pytest.raises(ValueError, match="path must be one of"):
        layer.path = "fast"
    with pytest.raises(ValueError, match="path must be one of"):
        am.add_adapters(nn.Sequential(nn.Linear(4, 4)), "elora", ["0"], r=8, path="matrix")


def test_forced_weight_path_trains_aflora_projections_like_the_token_path():
    models, x = build_pair("toy", 4, method="aflora", adaptive=True)
    g = {p: run(m, x)[1] for p, m in models.items()}
    assert any(k.endswith("lora_A") for k in g["token"])
    for k in g["token"]:
        assert rel(g["weight"][k], g["token"][k]) <= 1e-5, k


def test_freezer_decisions_do_not_depend_on_the_path():
    from test_core import train_aflora
    _, reference, _, _ = train_aflora(60)
    orig = am.AFLoRALinear.__init__

    def forced(self, *a, **k):
        orig(self, *a, **k)
        self.path = "weight"
    am.AFLoRALinear.__init__ = forced
    try:
        model, forced_run, _, _ = train_aflora(60)
    finally:
        am.AFLoRALinear.__init__ = orig
    assert all(layer.path == "weight" for _, layer in am.adapter_layers(model))
    assert forced_run.frozen_at == reference.frozen_at


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_keeps_the_adapter_in_fp32(dtype):
    """On a bf16/fp16 base the weight path must not fold ΔW into a low-precision W0 (its small
    elements would round away there): it adds x ΔWᵀ computed in fp32. Bound: the output is within
    the output's own rounding (2 eps) of the fp32 reference, and the gradients of d and b equal the
    token path's to fp32 precision (1e-5), where folding ΔW into a low-precision weight would give
    them the low precision's error."""
    torch.manual_seed(0)
    layer = am.ELoRALinear(nn.Linear(64, 96).to(dtype), r=256, path="weight")
    with torch.no_grad():
        layer.lora_b.normal_(0, 1e-3)
    x = torch.randn(32, 64).to(dtype)
    w0 = layer.base_layer.weight.float()
    ref = x.float() @ (w0 + layer.delta_weight()).T + layer.base_layer.bias.float()     # fp32 truth
    eps = torch.finfo(dtype).eps
    token = copy.deepcopy(layer)
    token.path = "token"
    gy = torch.randn(32, 96).to(dtype)
    grads = {}
    for name, m in (("weight", layer), ("token", token)):
        y = m(x)
        assert y.dtype == dtype and rel(y.float(), ref) <= 2 * eps, name
        m.zero_grad()
        y.backward(gy)
        grads[name] = (m.lora_d.grad.clone(), m.lora_b.grad.clone())
    for a, b in zip(grads["weight"], grads["token"]):
        assert rel(a, b) <= 1e-5
    d, b = layer.lora_d.detach().clone().requires_grad_(), layer.lora_b.detach().clone().requires_grad_()
    folded_w = (w0 + (b[:, None] * layer.lora_B) @ (d[:, None] * layer.lora_A)).to(dtype)
    nn.functional.linear(x, folded_w, layer.base_layer.bias).backward(gy)
    assert rel(b.grad, grads["token"][1]) > 1e-4                      # what folding would have cost


def test_weight_path_under_bf16_autocast_agrees_with_the_token_path():
    """Under autocast W0 is cast to bf16 for the matmul, so the weight path adds x ΔWᵀ separately
    (never folded into W0): outputs within bf16 rounding of the token path's, gradients of d and b
    within bf16 accumulation error."""
    torch.manual_seed(0)
    layer = am.ELoRALinear(nn.Linear(128, 192), r=512, path="weight")
    with torch.no_grad():
        layer.lora_b.normal_(0, 1e-2)
    token = copy.deepcopy(layer)
    token.path = "token"
    x, gy = torch.randn(64, 128), torch.randn(64, 192)
    out = {}
    for name, m in (("weight", layer), ("token", token)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not m._fused(x)
            y = m(x)
        y.float().backward(gy)
        out[name] = (y.float(), m.lora_d.grad, m.lora_b.grad)
    eps = torch.finfo(torch.bfloat16).eps
    assert rel(out["weight"][0], out["token"][0]) <= 2 * eps
    for a, b in zip(out["weight"][1:], out["token"][1:]):
        assert rel(a, b) <= 0.03
