"""Helper process for tests/test_resume.py: AFLoRA on a small torch MLP (dropout on, AdamW, a
warm-up/decay schedule, gradient clipping, batches drawn from torch's and python's global RNGs).
Plain torch rather than a transformers BERT so that each process starts in about a second.

    python tests/_resume_worker.py OUT --steps N                      uninterrupted run
    python tests/_resume_worker.py OUT --steps N --stop K --save CKPT  stop after K steps, save
    python tests/_resume_worker.py OUT --steps N --resume CKPT          resume in a new process
OUT receives the final adapter tensors, frozen_at and the freezer history (torch.save of plain data).
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import aflora_min as am  # noqa: E402

nn = torch.nn


class MLP(nn.Module):
    def __init__(self, sizes=(16, 32, 24, 40), classes=3, p=0.1):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(sizes[-1], classes)

    def forward(self, x):
        for layer in self.layers:
            x = self.dropout(torch.relu(layer(x)))
        return self.classifier(x)


def build(total_steps):
    torch.manual_seed(0)
    random.seed(0)
    model = am.add_adapters(MLP(), "aflora", ["layers.0", "layers.1", "layers.2"], r=4).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    warm = 4
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min((t + 1) / warm, max(0.0, (total_steps - t) / (total_steps - warm))))
    freezer = am.AFLoRAFreezer(model, total_steps=total_steps, t_init=5, t_final=10, window=5, optimizer=opt)
    return model, opt, sched, freezer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--stop", type=int)
    ap.add_argument("--save")
    ap.add_argument("--resume")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, opt, sched, freezer = build(a.steps)
    start = am.load_checkpoint(a.resume, model, opt, sched, freezer)["step"] if a.resume else 0
    for step in range(start, a.stop or a.steps):
        batch = random.randint(6, 12)                        # python RNG
        x = torch.randn(batch, 16)                           # torch RNG (and dropout below)
        labels = torch.randint(0, 3, (batch,))
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        freezer.step()
        opt.step()
        sched.step()
        opt.zero_grad()
    if a.save:
        am.save_checkpoint(a.save, model, opt, sched, freezer, step=a.stop)
    torch.save({"adapter": am.adapter_state_dict(model), "frozen_at": freezer.frozen_at,
                "history": freezer.history, "lr": sched.get_last_lr()}, a.out)


if __name__ == "__main__":
    main()
