"""export_lora writes a standard PEFT LoRA adapter: the real peft package loads it on a fresh base
model and gives our logits (max abs difference <= 1e-5, fp32), for LoRA, ELoRA and AFLoRA, on a
BERT, a Llama and a plain torch MLP (task_type None, per-module ranks through rank_pattern)."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import aflora_min as am

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")


class MLP(nn.Module):
    """16 -> 32 -> 8 -> 3: at r=12, fc2 (8 x 32) has r > min(in, out) and exports at rank 8."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.classifier = nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg)


ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(1))
ARCHS = {  # make, targets, trained head, input
    "bert": (bert, ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
             "classifier", {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
    "llama": (llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "score", {"input_ids": ids}),
    "mlp": (MLP, ["fc1", "fc2"], "classifier", torch.randn(5, 16, generator=torch.Generator().manual_seed(1))),
}
RANKS = {"bert": {"lora": 4, "elora": 1024, "aflora": 4}, "llama": {"lora": 8, "elora": 64, "aflora": 4},
         "mlp": {"lora": 12, "elora": 12, "aflora": 12}}


def fresh(arch):
    torch.manual_seed(0)
    return ARCHS[arch][0]().eval()


def logits(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def trained(arch, method, **options):
    """Our model with every adapter and the head moved off their init (b = 0 would hide errors)."""
    _, targets, head, _ = ARCHS[arch]
    model = am.add_adapters(fresh(arch), method, targets, r=RANKS[arch][method], train=(head,), **options)
    g = torch.Generator().manual_seed(7)
    for n, p in model.named_parameters():
        if p.requires_grad or ".lora_" in n:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    if method == "aflora":  # a frozen matrix exports like any other
        next(m for _, m in am.adapter_layers(model) if m.adaptive).lora_A.requires_grad_(False)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", ["lora", "elora", "aflora"])
def test_peft_loads_the_export_and_gives_our_logits(arch, method, tmp_path):
    model = trained(arch, method, **({"alpha": 16} if method == "lora" else {}))
    config = am.export_lora(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == config
    assert config["modules_to_save"] == [ARCHS[arch][2]]
    assert config["task_type"] == (None if arch == "mlp" else "SEQ_CLS")
    loaded = peft.PeftModel.from_pretrained(fresh(arch), tmp_path).eval()
    x = ARCHS[arch][3]
    ours, theirs = logits(model, x), logits(loaded, x)
    assert (ours - logits(fresh(arch), x)).abs().max() > 1e-2  # the adapters do change the output
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_export_key_layout_and_exact_lower_rank_factorisation(tmp_path):
    from safetensors.torch import load_file
    model = trained("mlp", "elora")  # r = 12: fc1 (32 x 16) keeps rank 12, fc2 (8 x 32) gets rank 8
    config = am.export_lora(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(["base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight",
                                      "base_model.model.fc2.lora_A.weight", "base_model.model.fc2.lora_B.weight",
                                      "base_model.model.classifier.weight", "base_model.model.classifier.bias"])
    assert (config["r"], config["lora_alpha"]) in {(12, 12), (8, 8)}
    assert tensors["base_model.model.fc2.lora_A.weight"].shape == (8, 32)
    assert torch.equal(tensors["base_model.model.fc2.lora_B.weight"], torch.eye(8))  # in > out: A' = ΔW, B' = I
    assert torch.equal(tensors["base_model.model.fc2.lora_A.weight"], model.fc2.delta_weight())
    for name, layer in am.adapter_layers(model):
        A, B, alpha = am.lora_factors(layer)
        torch.testing.assert_close(alpha / A.shape[0] * B @ A, layer.delta_weight(), rtol=0, atol=1e-6)


def test_peft_own_save_uses_the_same_key_layout(tmp_path):
    """The layout we write is the one peft itself writes (keys, shapes, modules_to_save naming)."""
    from safetensors.torch import load_file
    ours = trained("bert", "lora")
    am.export_lora(ours, tmp_path / "ours")
    cfg = peft.LoraConfig(r=4, target_modules=ARCHS["bert"][1], modules_to_save=["classifier"],
                          task_type="SEQ_CLS")
    peft.get_peft_model(fresh("bert"), cfg).save_pretrained(tmp_path / "peft")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_exported_adapter_merges_in_peft_like_ours(tmp_path):
    model = trained("bert", "aflora")
    am.export_lora(model, tmp_path)
    merged = peft.PeftModel.from_pretrained(fresh("bert"), tmp_path).merge_and_unload()
    x = ARCHS["bert"][3]
    assert (logits(merged, x) - logits(am.merge_adapters(copy.deepcopy(model)), x)).abs().max() <= 1e-5


def test_nested_head_exports_as_one_module_to_save(tmp_path):
    """RoBERTa's head is classifier.dense + classifier.out_proj: exported whole, as "classifier"."""
    cfg = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3)

    def roberta():
        torch.manual_seed(0)
        return transformers.RobertaForSequenceClassification(cfg).eval()

    model = am.add_adapters(roberta(), "aflora", ["query", "value", "intermediate.dense", "output.dense"], r=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    assert am.export_lora(model, tmp_path)["modules_to_save"] == ["classifier"]
    loaded = peft.PeftModel.from_pretrained(roberta(), tmp_path).eval()
    x = {"input_ids": ids + 2}
    assert (logits(model, x) - logits(loaded, x)).abs().max().item() <= 1e-5
