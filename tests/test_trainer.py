"""AFLoRA under the Hugging Face Trainer (the real Trainer, a tiny BERT built from a config, CPU) and
adapter files whose random projections are checked on load."""
import types

import pytest
import torch

import aflora_min as am

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
ACCUM, BATCH, T, T_INIT, T_FINAL = 2, 4, 24, 2, 8


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return am.add_adapters(transformers.BertForSequenceClassification(cfg), "aflora", TARGETS, r=4, seed=0)


def dataset(n=T * ACCUM * BATCH):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, 8), generator=g)
    labels = (ids[:, 0] > 50).long()                      # learnable from the first token
    return [dict(input_ids=i, labels=y) for i, y in zip(ids, labels)]


class InOrderTrainer(Trainer):
    """Batches in dataset order, so a hand-written loop can see exactly the same ones."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                max_steps=T, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
                seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, optim="adamw_torch")
    base.update(kw)
    return TrainingArguments(**base)


def mean_over_the_accumulated_batch(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed over a micro-batch / the examples of the whole optimizer step, so the
    accumulated gradient is that of the mean over the step's batch (whatever the transformers version
    does with the model's own loss under accumulation)."""
    if num_items_in_batch is None:    # older transformers (4.46): the mean, divided by the accumulation for us
        return torch.nn.functional.cross_entropy(outputs.logits, labels)
    return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


def run_trainer(out, resume=None, callback=True, seen=None, **kw):
    model = tiny_bert()
    freezer = am.AFLoRAFreezer(model, total_steps=T, t_init=T_INIT, t_final=T_FINAL, window=2)
    calls = []
    original = freezer.step
    freezer.step = lambda: (calls.append(freezer.step_count), original())[1]
    if seen is not None:                      # record the micro-batches the Trainer feeds the model
        model.register_forward_pre_hook(lambda m, a, k: seen.append({n: k[n].clone() for n in ("input_ids",)}),
                                        with_kwargs=True)
    trainer = InOrderTrainer(model=model, args=args(out, **kw), train_dataset=dataset(),
                             callbacks=[am.trainer_callback(freezer)] if callback else [],
                             compute_loss_func=mean_over_the_accumulated_batch)
    trainer.train(resume_from_checkpoint=resume)
    return model, freezer, calls


def adapters(model):
    return {k: v for k, v in am.adapter_state_dict(model).items() if ".lora_" in k and not k.endswith(".frozen")}


def test_one_freezer_step_per_optimizer_step_and_everything_frozen_by_T_minus_tf(tmp_path):
    model, freezer, calls = run_trainer(tmp_path)
    assert calls == list(range(T))                                  # once per optimizer step, not per micro-batch
    assert freezer.step_count == T
    assert set(freezer.frozen_at) == set(freezer.params)
    assert max(freezer.frozen_at.values()) <= T - T_FINAL < T
    assert min(freezer.frozen_at.values()) > T_INIT
    assert all(not p.requires_grad for p in freezer.params.values())


def hand_written_run(batches, scale):
    """The same point as helpers.train: accumulate, clip, freezer.step(), optimizer step."""
    model = tiny_bert()
    freezer = am.AFLoRAFreezer(model, total_steps=T, t_init=T_INIT, t_final=T_FINAL, window=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    freezer.optimizer = opt
    model.train()
    for step in range(T):
        for micro in range(ACCUM):
            batch = batches[step * ACCUM + micro]
            logits = model(input_ids=batch["input_ids"]).logits
            (torch.nn.functional.cross_entropy(logits, batch["labels"]) * scale).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        freezer.step()
        opt.step()
        opt.zero_grad()
    freezer.remove()
    return model, freezer


def test_callback_and_hand_written_loop_freeze_the_same_matrices_at_the_same_steps(tmp_path):
    seen = []
    trained, by_trainer, _ = run_trainer(tmp_path, seen=seen)
    data = dataset()
    batches = [{k: torch.stack([ex[k] for ex in data[i * BATCH:(i + 1) * BATCH]]) for k in data[0]}
               for i in range(T * ACCUM)]
    assert len(seen) == len(batches) and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(seen, batches))
    # How a micro-batch's loss is scaled under accumulation has changed across transformers releases
    # (the mean over the step's batch, or the sum of the micro-batch means): the hand-written loop that
    # reproduces the Trainer's adapters is the one doing the same arithmetic, and it must freeze alike.
    target = adapters(trained)
    matches = []
    for scale in (1 / ACCUM, 1.0):
        model, freezer = hand_written_run(batches, scale)
        got = adapters(model)
        if all(torch.allclose(got[k], target[k], rtol=1e-4, atol=1e-6) for k in target):
            matches.append(freezer)
    assert len(matches) == 1, "no (or more than one) loss scaling reproduces the Trainer run"
    assert matches[0].frozen_at == by_trainer.frozen_at


def test_resume_from_a_trainer_checkpoint_gives_the_uninterrupted_run(tmp_path):
    whole, full, _ = run_trainer(tmp_path / "whole")
    events = sorted(set(full.frozen_at.values()))
    assert len(events) >= 2
    stop = events[0] + 1                                             # between two freeze events
    out = tmp_path / "cut"
    run_trainer(out, save_strategy="steps", save_steps=stop, max_steps=T)    # writes checkpoint-<stop>, ...
    assert (out / f"checkpoint-{stop}" / "aflora_freezer.pt").is_file()
    saved = torch.load(out / f"checkpoint-{stop}" / "aflora_freezer.pt", weights_only=True)
    assert 0 < len(saved["frozen_at"]) < len(full.frozen_at)
    resumed, freezer, calls = run_trainer(out, resume=str(out / f"checkpoint-{stop}"), save_strategy="no")
    assert calls == list(range(stop, T))
    assert freezer.frozen_at == full.frozen_at
    a, b = adapters(resumed), adapters(whole)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_without_the_callback_the_forgot_step_warning_fires(tmp_path):
    model = tiny_bert()
    am.AFLoRAFreezer(model, total_steps=T, t_init=T_INIT, t_final=T_FINAL, forget_warning_after=10)
    trainer = InOrderTrainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=dataset())
    with pytest.warns(UserWarning, match="without AFLoRAFreezer.step"):
        trainer.train()


def test_callback_refuses_ddp_without_find_unused_and_a_wrong_total(tmp_path):
    model = tiny_bert()
    freezer = am.AFLoRAFreezer(model, total_steps=T, t_init=T_INIT, t_final=T_FINAL)
    cb = am.trainer_callback(freezer)
    state = types.SimpleNamespace(max_steps=T, global_step=0)
    ddp = types.SimpleNamespace(world_size=2, ddp_find_unused_parameters=False, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        cb.on_train_begin(ddp, state, None)
    ddp.ddp_find_unused_parameters = None                            # Trainer's default: fine without checkpointing
    cb.on_train_begin(ddp, state, None, model=types.SimpleNamespace(is_gradient_checkpointing=False))
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        cb.on_train_begin(ddp, state, None, model=types.SimpleNamespace(is_gradient_checkpointing=True))
    with pytest.raises(ValueError, match="total_steps=24 but the Trainer will take max_steps=30"):
        cb.on_train_begin(types.SimpleNamespace(world_size=1), types.SimpleNamespace(max_steps=30, global_step=0), None)
    assert freezer.step_count == 0 and not freezer.frozen_at
    freezer.remove()


# ---------------------------------------------------------------------------------------------
# Adapter files that stay reproducible: the projections' fingerprint

def elora():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2)
    return am.add_adapters(transformers.BertForSequenceClassification(cfg), "elora", TARGETS, r=64, seed=3)


def test_projections_that_differ_from_the_saved_run_refuse_to_load():
    trained = elora()
    with torch.no_grad():
        for _, layer in am.adapter_layers(trained):
            layer.lora_b.normal_()
    state = am.adapter_state_dict(trained)
    assert all(k not in state for k in ("bert.encoder.layer.0.attention.self.query.lora_A",))
    assert sum(k.endswith(".fingerprint") for k in state) == 12
    fresh = elora()
    am.load_adapter_state_dict(fresh, state)                         # same torch, same seed: loads
    other = elora()
    layer = other.bert.encoder.layer[1].output.dense
    with torch.no_grad():                                            # as if torch drew other numbers
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="regenerated from seed .* are not the ones this adapter was trained with"):
        am.load_adapter_state_dict(other, state)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())   # nothing changed
    with_projections = am.adapter_state_dict(trained, save_projections=True)
    am.load_adapter_state_dict(other, with_projections)              # the saved A, B win
    torch.testing.assert_close(layer.lora_A, trained.bert.encoder.layer[1].output.dense.lora_A)


def test_checkpoints_carry_the_fingerprint(tmp_path):
    model = elora()
    am.save_checkpoint(tmp_path / "c.pt", model)
    other = elora()
    with torch.no_grad():
        other.bert.encoder.layer[0].attention.self.query.lora_B.mul_(2)
    with pytest.raises(ValueError, match="not the ones this adapter was trained with"):
        am.load_checkpoint(tmp_path / "c.pt", other)
