"""Unit tests of aflora_min: a table of (model, method) crossed with properties, PEFT-style,
then the schedule, the freezing score and rule, and AFLoRA in a short real training loop."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import aflora_min as am

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
METHODS = {"lora": 4, "elora": 64, "aflora": 4}


class ToyNet(nn.Module):
    """Square and non-square Linears, a bias-free one, and a classifier."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 24)
        self.mid = nn.Linear(24, 24, bias=False)
        self.down = nn.Linear(24, 12)
        self.classifier = nn.Linear(12, 3)

    def forward(self, x):  # (B, 12) -> (B, 3)
        return self.classifier(torch.tanh(self.down(torch.relu(self.mid(torch.relu(self.up(x)))))))


def tiny_bert(hidden=32, layers=2, ffn=64, heads=2):
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def logits(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


MODELS = {
    "toy": (lambda: (torch.manual_seed(0), ToyNet())[1], ["up", "mid", "down"],
            lambda: torch.randn(5, 12, generator=torch.Generator().manual_seed(1))),
    "bert": (tiny_bert, BERT_TARGETS,
             lambda: {"input_ids": torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))}),
}
CASES = [(m, meth) for m in MODELS for meth in METHODS]


def build(model_name, method, **options):
    make, targets, make_x = MODELS[model_name]
    base = make()
    model = am.add_adapters(copy.deepcopy(base), method, targets, r=METHODS[method], **options)
    return base, model, make_x()


@torch.no_grad()
def randomize(model, seed=0, trainable_only=False):
    """Give every adapter a non-zero update (B = 0 / b = 0 at init would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in am.adapter_layers(model):
        for p in layer.parameters(recurse=False):
            if p.requires_grad or not trainable_only:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def formula_delta(layer):
    """ΔW written out from the paper's equations, independent of delta_weight()."""
    if isinstance(layer, am.LoRALinear):
        return layer.alpha / layer.r * layer.lora_B @ layer.lora_A
    return torch.diag(layer.lora_b) @ layer.lora_B @ torch.diag(layer.lora_d) @ layer.lora_A


# ---------------------------------------------------------------------------------------------
# The property table

@pytest.mark.parametrize("model_name,method", CASES)
def test_identity_at_init(model_name, method):
    base, model, x = build(model_name, method)
    torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)
    for _, layer in am.adapter_layers(model):
        assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("model_name,method", CASES)
def test_forward_equals_base_plus_delta(model_name, method):
    _, model, _ = build(model_name, method)
    randomize(model)
    for name, layer in am.adapter_layers(model):
        torch.testing.assert_close(layer.delta_weight(), formula_delta(layer), rtol=1e-5, atol=1e-6)
        x = torch.randn(4, 3, layer.in_features)
        expected = layer.base_layer(x) + x @ layer.delta_weight().T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name,method", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(model_name, method):
    _, model, x = build(model_name, method)
    randomize(model)
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in am.adapter_layers(model)}
    before = logits(model, x)
    am.merge_adapters(model)
    assert all(layer.merged for _, layer in am.adapter_layers(model))
    torch.testing.assert_close(logits(model, x), before, rtol=1e-5, atol=1e-5)
    am.merge_adapters(model)  # idempotent: no double add
    torch.testing.assert_close(logits(model, x), before, rtol=1e-5, atol=1e-5)
    am.unmerge_adapters(model)
    am.unmerge_adapters(model)
    for n, layer in am.adapter_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, w0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, x), before, rtol=1e-5, atol=1e-5)
    model.eval()  # eval() never merges
    assert not any(layer.merged for _, layer in am.adapter_layers(model))


@pytest.mark.parametrize("model_name,method", CASES)
def test_disabled_equals_base(model_name, method):
    base, model, x = build(model_name, method)
    randomize(model)
    assert not torch.allclose(logits(model, x), logits(base, x))
    with am.disable_adapters(model):
        torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)
    assert not torch.allclose(logits(model, x), logits(base, x))


@pytest.mark.parametrize("model_name,method", CASES)
def test_only_adapters_and_classifier_train(model_name, method):
    base, model, x = build(model_name, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        logits(model, x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


@pytest.mark.parametrize("model_name,method", CASES)
def test_adapter_state_dict_round_trip(model_name, method):
    _, model, x = build(model_name, method)
    randomize(model, seed=3, trainable_only=True)  # what training can change
    if method == "aflora":  # a frozen flag must travel too
        name, layer = next((n, l) for n, l in am.adapter_layers(model) if l.adaptive)
        layer.lora_A.requires_grad_(False)
    state = am.adapter_state_dict(model)
    assert not any("base_layer" in k for k in state)
    _, fresh, _ = build(model_name, method)
    am.load_adapter_state_dict(fresh, state)
    torch.testing.assert_close(logits(fresh, x), logits(model, x), rtol=0, atol=0)
    assert ({n for n, p in fresh.named_parameters() if p.requires_grad}
            == {n for n, p in model.named_parameters() if p.requires_grad})


def test_elora_projections_regenerate_from_seed_and_agree_across_devices():
    _, a, _ = build("toy", "elora")
    _, b, _ = build("toy", "elora")
    _, c, _ = build("toy", "elora", seed=5)
    la, lb, lc = (dict(am.adapter_layers(m))["up"] for m in (a, b, c))
    assert torch.equal(la.lora_A, lb.lora_A) and not torch.equal(la.lora_A, lc.lora_A)
    layers = [l for _, l in am.adapter_layers(a)]
    assert not torch.equal(layers[0].lora_B[:, :4], layers[1].lora_B[:, :4])  # one pair per module
    state = am.adapter_state_dict(a)
    assert "up.lora_A" not in state and int(state["up.seed"]) == la.seed
    with pytest.raises(ValueError, match="seed"):
        am.load_adapter_state_dict(c, state)


def test_projection_seeds_never_collide_across_run_seeds_and_layers():
    """seed + i would give run s+1's layer i the projections of run s's layer i+1; the hashed
    per-layer seed gives every (run seed, layer) pair its own A and B."""
    names = [f"bert.encoder.layer.{i}.{t}" for i in range(12) for t in BERT_TARGETS]
    seeds = {am.layer_seed(s, n) for s in range(50) for n in names}
    assert len(seeds) == 50 * len(names)
    assert am.layer_seed(3, names[0]) == am.layer_seed(3, names[0])           # deterministic
    runs = [am.add_adapters(tiny_bert(), "elora", BERT_TARGETS, r=8, seed=s) for s in (0, 1)]
    A = [[layer.lora_A for _, layer in am.adapter_layers(m)] for m in runs]
    assert len(A[0]) == 12
    for a in A[0]:
        assert not any(a.shape == b.shape and torch.equal(a, b) for b in A[1])
    for name, layer in am.adapter_layers(runs[0]):
        assert layer.seed == am.layer_seed(0, name)


def test_adapter_file_from_other_projection_seeds_is_refused():
    state = am.adapter_state_dict(am.add_adapters(tiny_bert(), "elora", BERT_TARGETS, r=8, seed=0))
    model = am.add_adapters(tiny_bert(), "elora", BERT_TARGETS, r=8, seed=1)
    with pytest.raises(ValueError, match="projection seed"):
        am.load_adapter_state_dict(model, state)


def test_lora_equals_peft_lora():
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    x = MODELS["bert"][2]()
    ours = am.add_adapters(copy.deepcopy(base), "lora", BERT_TARGETS, r=4, alpha=8)
    randomize(ours, seed=7)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=BERT_TARGETS, lora_dropout=0.0,
                          modules_to_save=["classifier"])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    peft_params = dict(theirs.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, layer in am.adapter_layers(ours):
            for k in ("lora_A", "lora_B"):
                peft_params[f"base_model.model.{name}.{k}.default.weight"].copy_(getattr(layer, k))
                copied += 1
    assert copied == 2 * len(list(am.adapter_layers(ours)))
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Parameter counts on a MiniLM-L6-shaped BERT (6 layers, hidden 384, FFN 1536)

@pytest.mark.parametrize("method,r,expected", [("lora", 8, 331_776), ("elora", 1024, 57_600),
                                               ("aflora", 4, 113_040)])
def test_parameter_counts_on_minilm_shape(method, r, expected):
    model = am.add_adapters(tiny_bert(hidden=384, layers=6, ffn=1536, heads=12), method, BERT_TARGETS, r=r)
    trainable, total = am.count_parameters(model)
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier" in n)
    assert trainable - head == expected == am.AFLoRAFreezer.trainable_adapter_params(model)
    if method == "aflora":
        freezer = am.AFLoRAFreezer(model, total_steps=100, t_init=10, t_final=10)
        assert len(freezer.params) == 6 * 2 * 2  # intermediate and output A, B per layer
        for n in freezer.params:
            freezer.freeze(n)
        assert am.AFLoRAFreezer.trainable_adapter_params(model) == 20_880


def test_print_trainable_parameters_format(capsys):
    _, model, _ = build("toy", "lora")
    am.print_trainable_parameters(model)
    trainable, total = am.count_parameters(model)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}")


# ---------------------------------------------------------------------------------------------
# The cubic schedule

def test_cubic_schedule_values():
    T, ti, tf = 100, 10, 30
    assert am.cubic_schedule(0, T, ti, tf) == 1.0
    assert am.cubic_schedule(ti, T, ti, tf) == 1.0
    assert am.cubic_schedule(T - tf, T, ti, tf) == 0.0
    assert am.cubic_schedule(T - tf + 1, T, ti, tf) == 0.0
    assert am.cubic_schedule(T, T, ti, tf) == 0.0
    for t in (11, 25, 40, 69):
        assert am.cubic_schedule(t, T, ti, tf) == pytest.approx((1 - (t - ti) / (T - ti - tf)) ** 3)
    values = [am.cubic_schedule(t, T, ti, tf) for t in range(T + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------------------------------------
# The freezing score and rule

def set_grads(freezer, grads):
    for n, g in grads.items():
        freezer.params[n].grad = g.clone()


def test_score_equals_hand_computation_over_two_windows():
    _, model, _ = build("toy", "aflora")
    freezer = am.AFLoRAFreezer(model, total_steps=100, t_init=50, t_final=10, window=2,
                               beta1=0.85, beta2=0.95)
    g = torch.Generator().manual_seed(0)
    steps = [{n: torch.randn(p.shape, generator=g) for n, p in freezer.params.items()} for _ in range(4)]
    for grads in steps:
        set_grads(freezer, grads)
        freezer.step()
    for n in freezer.params:
        I1 = (steps[0][n].abs() + steps[1][n].abs()) / 2
        I2 = (steps[2][n].abs() + steps[3][n].abs()) / 2
        ipt1 = 0.15 * I1
        unc1 = 0.05 * (I1 - ipt1).abs()
        ipt2 = 0.85 * ipt1 + 0.15 * I2
        unc2 = 0.95 * unc1 + 0.05 * (I2 - ipt2).abs()
        torch.testing.assert_close(freezer.element_scores(n), ipt2 * unc2)
        assert [s for s, _ in freezer.score_history[n]] == [2, 4]
        assert freezer.score_history[n][-1][1] == pytest.approx((ipt2 * unc2).mean().item(), rel=1e-5)


def _freezer_with_scores(rule, means):
    """A freezer over four matrices whose element scores we set by hand."""
    model = am.add_adapters(ToyNet(), "aflora", ["up", "down"], train=())
    freezer = am.AFLoRAFreezer(model, total_steps=100, t_init=10, t_final=10, rule=rule)
    g = torch.Generator().manual_seed(0)
    for n, m in zip(freezer.params, means):
        freezer.exp_avg_ipt[n] = m * torch.rand(freezer.params[n].shape, generator=g) * 2
        freezer.exp_avg_unc[n] = torch.ones_like(freezer.params[n])
    return freezer, {n: freezer.element_scores(n).mean().item() for n in freezer.params}


@pytest.mark.parametrize("rho", [0.9, 0.6, 0.3, 0.05])
def test_quantile_rule_is_the_released_kth_value(rho):
    """q = the k-th smallest element score, k = int(N (1 - rho)) (the released code rounds down)."""
    freezer, scores = _freezer_with_scores("quantile", [1.0, 2.0, 3.0, 4.0])
    names = list(freezer.params)
    elems = np.sort(np.concatenate([freezer.element_scores(n).flatten().numpy() for n in names]))
    q = elems[int(len(elems) * (1 - rho)) - 1]
    assert freezer.to_freeze(names, scores, rho) == [n for n in names if scores[n] < q]


def test_quantile_rule_rounds_k_down_and_k_zero_freezes_nothing():
    """Two matrices of 2 elements each, scores {1, 9} and {2, 3}: mean 5 and 2.5. At 1 - rho = 0.74,
    N (1 - rho) = 2.96: the released k = 2 gives q = 2 (nothing has a mean below it); rounding up
    (k = 3) would give q = 3 and freeze the second matrix. 1 - rho = 0.2: k = 0, nothing freezes."""
    model = am.add_adapters(nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 1)), "aflora", ["0", "1"],
                            r=1, train=(), adaptive=True)
    freezer = am.AFLoRAFreezer(model, total_steps=100, t_init=10, t_final=10)
    names = ["0.lora_B", "1.lora_A"]
    freezer.exp_avg_ipt[names[0]] = torch.tensor([[1.0, 9.0]]).reshape(freezer.params[names[0]].shape)
    freezer.exp_avg_ipt[names[1]] = torch.tensor([[2.0, 3.0]]).reshape(freezer.params[names[1]].shape)
    for n in names:
        freezer.exp_avg_unc[n] = torch.ones_like(freezer.params[n])
    scores = {n: freezer.element_scores(n).mean().item() for n in names}
    assert scores == {names[0]: 5.0, names[1]: 2.5}
    assert freezer.to_freeze(names, scores, 0.26) == []
    assert freezer.to_freeze(names, scores, 0.24) == [names[1]]        # k = 3: q = 3
    assert freezer.to_freeze(names, scores, 0.8) == []                 # k = 0
    assert freezer.to_freeze(names, scores, 0.0) == names


def test_everything_left_freezes_at_T_minus_tf_even_after_non_finite_windows():
    _, model, _ = build("toy", "aflora")
    total, t_init, t_final = 40, 5, 10
    freezer = am.AFLoRAFreezer(model, total_steps=total, t_init=t_init, t_final=t_final, window=5)
    nan = {n: torch.full(p.shape, float("nan")) for n, p in freezer.params.items()}
    with pytest.warns(UserWarning, match="non-finite"):
        for t in range(1, total - t_final + 1):
            set_grads(freezer, nan)
            new = freezer.step()
            assert (new != []) == (t == total - t_final), t
    assert set(freezer.frozen_at) == set(freezer.params)
    assert set(freezer.frozen_at.values()) == {total - t_final}
    assert all(not p.requires_grad for p in freezer.params.values())


def test_rank_rule_freezes_lowest_until_fraction_reached():
    freezer, scores = _freezer_with_scores("rank", [3.0, 1.0, 4.0, 2.0])
    names = list(freezer.params)
    assert freezer.to_freeze(names, scores, 0.75) == [names[1]]
    assert freezer.to_freeze(names, scores, 0.5) == [names[1], names[3]]
    assert freezer.to_freeze(names, scores, 0.0) == names


# ---------------------------------------------------------------------------------------------
# AFLoRA in a short real training loop

def train_aflora(steps_to_run, total=60, t_init=10, t_final=20, state=None, rule="quantile"):
    base, model, _ = build("bert", "aflora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    freezer = am.AFLoRAFreezer(model, total_steps=total, t_init=t_init, t_final=t_final,
                               window=5, optimizer=opt, rule=rule)
    if state is not None:
        am.load_adapter_state_dict(model, state["adapters"])
        opt.load_state_dict(state["optimizer"])
        freezer.load_state_dict(state["freezer"])
    g = torch.Generator().manual_seed(42)
    batches = [(torch.randint(0, 100, (8, 6), generator=g), torch.randint(0, 2, (8,), generator=g))
               for _ in range(total)]
    log = []
    for t in range(freezer.step_count, steps_to_run):
        ids, y = batches[t]
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = nn.functional.cross_entropy(model(input_ids=ids).logits, y)
        loss.backward()
        frozen_before = set(freezer.frozen_at)
        for n in frozen_before:
            assert freezer.params[n].grad is None, f"{n} is frozen but got a gradient"
        freezer.step()
        opt.step()
        opt.zero_grad()
        log.append((t + 1, set(freezer.frozen_at), snapshot, frozen_before))
    return model, freezer, opt, log


def test_aflora_training_loop_freezes_on_schedule():
    total, t_init, t_final = 60, 10, 20
    model, freezer, _, log = train_aflora(total, total, t_init, t_final)
    params = dict(model.named_parameters())
    previous = set()
    for step, frozen, snapshot, frozen_before in log:
        if step <= t_init:
            assert not frozen
        assert previous <= frozen  # frozen sets only grow
        previous = frozen
        if step > total - t_final:
            assert frozen == set(freezer.params)
        for n in frozen_before:  # a frozen matrix never moves again
            assert torch.equal(params[n], snapshot[n]), n
    assert set(freezer.frozen_at) == set(freezer.params)
    assert all(t_init < s <= total - t_final + 1 for s in freezer.frozen_at.values())
    counts = [c for _, c in freezer.history]
    square, inter, out = 4 + 32, 4 * 32 + 64 * 4 + 4 + 64, 4 * 64 + 32 * 4 + 4 + 32  # d, b (+ A, B)
    assert counts[0] == 2 * (4 * square + inter + out)
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert counts[-1] < freezer.time_averaged_trainable() < counts[0]


def test_frozen_matrices_stop_while_vectors_keep_training():
    model, freezer, _, log = train_aflora(45)
    params = dict(model.named_parameters())
    step, _, snapshot, frozen_before = log[-1]
    assert frozen_before, "expected some matrices frozen by step 45"
    for n in frozen_before:
        assert not params[n].requires_grad and torch.equal(params[n], snapshot[n])
    moved = [n for n in params if n.endswith(("lora_d", "lora_b")) and not torch.equal(params[n], snapshot[n])]
    assert len(moved) == 2 * len(list(am.adapter_layers(model)))


def test_resume_from_mid_run_state_gives_same_frozen_at():
    full_model, full, _, _ = train_aflora(60)
    first, last = min(full.frozen_at.values()), max(full.frozen_at.values())
    assert first < last
    model, freezer, opt, _ = train_aflora(first + 1)  # stop between two freeze events
    state = {"adapters": am.adapter_state_dict(model), "optimizer": copy.deepcopy(opt.state_dict()),
             "freezer": copy.deepcopy(freezer.state_dict())}
    assert 0 < len(state["freezer"]["frozen_at"]) < len(full.frozen_at)
    resumed_model, resumed, _, _ = train_aflora(60, state=state)
    assert resumed.frozen_at == full.frozen_at
    assert resumed.history == full.history
    for (n, a), (_, b) in zip(am.adapter_state_dict(resumed_model).items(),
                              am.adapter_state_dict(full_model).items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_freezer_warns_when_step_is_never_called():
    _, model, x = build("toy", "aflora")
    freezer = am.AFLoRAFreezer(model, total_steps=100, t_init=10, t_final=10, forget_warning_after=5)
    model.train()
    with pytest.warns(UserWarning, match="without AFLoRAFreezer.step"):
        for _ in range(5):
            model(x)
    freezer.remove()


def test_nested_disable_adapters_restores_the_outer_block():
    base, model, x = build("toy", "lora")
    randomize(model)
    with am.disable_adapters(model):
        with am.disable_adapters(model):
            pass
        torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)  # still disabled
    assert not torch.allclose(logits(model, x), logits(base, x))


def test_numpy_whole_numbers_are_accepted_as_ints():
    torch.manual_seed(0)
    model = am.add_adapters(ToyNet(), "aflora", ["up", "down"], r=np.int64(4), seed=np.int64(3))
    assert all(type(layer.r) is int and layer.r == 4 for _, layer in am.adapter_layers(model))
    reference = am.add_adapters(ToyNet(), "aflora", ["up", "down"], r=4, seed=3)
    assert torch.equal(model.up.lora_A, reference.up.lora_A)
    freezer = am.AFLoRAFreezer(model, total_steps=np.int64(30), t_init=2, t_final=5, window=np.int64(5))
    assert type(freezer.window) is int


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_freezer_follows_the_model_to_another_device():
    """The README's Trainer example builds the freezer before Trainer moves the model to the GPU."""
    _, model, x = build("toy", "aflora")
    freezer = am.AFLoRAFreezer(model, total_steps=30, t_init=2, t_final=5, window=2)
    model.cuda()
    for _ in range(12):
        model(x.cuda()).square().mean().backward()
        freezer.step()
        model.zero_grad()
    assert freezer.frozen_at and all(t.is_cuda for t in freezer.exp_avg_unc.values())
