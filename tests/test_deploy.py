"""Deploying what was trained, on the models people use: (MiniLM, a GPT-2 built from a small config)
x (lora, elora, aflora) crossed with merge_and_unload + the save_pretrained round trip, casts after
add_adapters, and (GPT-2's transformers Conv1D layers) training, freezing, merging and PEFT export."""
import copy

import pytest
import torch

import aflora_min as am

transformers = pytest.importorskip("transformers")

RANKS = {"lora": 4, "elora": 64, "aflora": 4}
BERT = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def minilm():
    import helpers
    torch.manual_seed(0)
    model, tok = helpers.load_model("SST-2")
    batch = tok(["a gripping, funny film", "a dull mess"], return_tensors="pt", padding=True)
    return model.eval(), BERT, ("classifier",), dict(batch)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=2,
                                  pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    return model, ["c_attn", "c_proj", "c_fc"], ("score",), dict(input_ids=ids)


MODELS = {"minilm": minilm, "gpt2": gpt2}
CASES = [(m, meth) for m in MODELS for meth in RANKS]


def adapted(model_name, method, **options):
    base, targets, train, inputs = MODELS[model_name]()
    model = am.add_adapters(copy.deepcopy(base), method, targets, r=RANKS[method], train=train, **options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                       # a trained-looking adapter: ΔW != 0
        for _, layer in am.adapter_layers(model):
            for p in layer.parameters(recurse=False):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return base, model, inputs


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def close(a, b, tol):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("model_name,method", CASES)
def test_merge_and_unload_gives_a_plain_model_that_round_trips(model_name, method, tmp_path):
    base, model, inputs = adapted(model_name, method)
    before = logits(model, inputs)
    types = {n: type(m) for n, m in base.named_modules()}
    assert am.merge_and_unload(model) is model
    assert not list(am.adapter_layers(model))
    assert {n: type(m) for n, m in model.named_modules()} == types          # no trace of the adapters
    assert not any(".lora_" in n or "base_layer" in n for n in model.state_dict())
    assert close(logits(model, inputs), before, 1e-5)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert close(logits(reloaded, inputs), before, 1e-5)


def test_save_pretrained_with_adapters_still_in_does_not_round_trip(tmp_path):
    """Why merge_and_unload exists: the wrapped layers save `...base_layer.weight`, which from_pretrained
    does not find, so those matrices come back freshly initialised."""
    _, model, inputs = adapted("gpt2", "lora")
    am.merge_adapters(model)
    before = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert any("base_layer" in k for k in model.state_dict())
    transformers.logging.set_verbosity_error()
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert not close(logits(reloaded, inputs), before, 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_name,method", CASES)
def test_casting_after_add_adapters_trains_and_stays_close(model_name, method, dtype):
    """Adapters follow a later cast, like every other parameter (add_adapters on a low-precision base
    is the way to keep fp32 adapters). The logits stay close to fp32's; forward, backward, a freezer
    step and an AdamW step run with finite gradients; .float() brings everything back to fp32."""
    _, model, inputs = adapted(model_name, method)
    ref = logits(model, inputs)
    model.to(dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert close(logits(model, inputs), ref, 0.05)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    freezer = am.AFLoRAFreezer(model, total_steps=10, t_init=1, t_final=2, optimizer=opt) if method == "aflora" else None
    out = model(**inputs, labels=torch.tensor([1, 0, 1][: len(inputs["input_ids"])]))
    out.loss.backward()
    if freezer is not None:
        freezer.step()
        freezer.remove()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    model.eval()
    model.float()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert logits(model, inputs).dtype == torch.float32
    model.to("cpu")                                      # a device move keeps working
    assert logits(model, inputs).shape == ref.shape


@pytest.mark.parametrize("method", list(RANKS))
def test_gpt2_conv1d_forward_merge_and_peft_export(method, tmp_path):
    peft = pytest.importorskip("peft")
    base, model, inputs = adapted("gpt2", method)
    layers = dict(am.adapter_layers(model))
    assert len(layers) == 2 * 4 and all(layer.fan_in_fan_out for layer in layers.values())
    layer = layers["transformer.h.0.attn.c_attn"]
    assert (layer.in_features, layer.out_features) == (32, 96)
    x = torch.randn(5, 32)
    w0 = layer.base_layer.weight                                       # (in, out): y = x W0 + b
    torch.testing.assert_close(layer(x), x @ w0 + layer.base_layer.bias + x @ layer.delta_weight().T)
    before = logits(model, inputs)
    am.merge_adapters(model)
    assert close(logits(model, inputs), before, 1e-5)
    am.unmerge_adapters(model)
    torch.testing.assert_close(layer.base_layer.weight, copy.deepcopy(base).transformer.h[0].attn.c_attn.weight)
    config = am.export_lora(model, tmp_path)
    assert config["fan_in_fan_out"] is True and config["modules_to_save"] == ["score"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert close(logits(loaded, inputs), before, 1e-5)


def test_gpt2_elora_weight_path_equals_token_path_on_conv1d():
    _, model, inputs = adapted("gpt2", "elora", path="token")
    ref = logits(model, inputs)
    for _, layer in am.adapter_layers(model):
        layer.path = "weight"
    assert close(logits(model, inputs), ref, 1e-5)


def test_gpt2_aflora_trains_and_freezes_everything_by_T_minus_tf():
    _, model, inputs = adapted("gpt2", "aflora")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    total, t_init, t_final = 30, 3, 10
    freezer = am.AFLoRAFreezer(model, total_steps=total, t_init=t_init, t_final=t_final, window=2, optimizer=opt)
    assert len(freezer.params) == 2 * 3 * 2        # c_attn, mlp.c_fc, mlp.c_proj are not square; A and B
    labels = torch.tensor([1, 0, 1])
    losses = []
    for _ in range(total):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        freezer.step()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert set(freezer.frozen_at) == set(freezer.params)
    assert max(freezer.frozen_at.values()) <= total - t_final
    assert losses[-1] < losses[0]
    freezer.remove()


def test_other_modules_still_get_the_clear_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="must name nn.Linear"):
        am.add_adapters(model, "lora", ["0"])
