"""Exact resume: stop mid-training, save_checkpoint, resume in a NEW process with load_checkpoint; the
freeze decisions and (on CPU) every final adapter tensor equal those of an uninterrupted run."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import aflora_min as am

WORKER = Path(__file__).with_name("_resume_worker.py")
STEPS, STOP = 40, 12  # the worker's freeze events fall at steps 10, 15 and 20: STOP lies between two


def run(*args):
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


def test_resume_in_a_new_process_is_bit_exact(tmp_path):
    full, part = run(tmp_path / "full.pt", "--steps", STEPS), run(
        tmp_path / "part.pt", "--steps", STEPS, "--stop", STOP, "--save", tmp_path / "ckpt.pt")
    wait(full), wait(part)
    wait(run(tmp_path / "resumed.pt", "--steps", STEPS, "--resume", tmp_path / "ckpt.pt"))
    full, part, resumed = (torch.load(tmp_path / f, weights_only=True) for f in ("full.pt", "part.pt", "resumed.pt"))
    assert 0 < len(part["frozen_at"]) < len(full["frozen_at"])  # frozen both before and after the stop
    assert resumed["frozen_at"] == full["frozen_at"]
    assert resumed["history"] == full["history"]
    assert resumed["lr"] == full["lr"]
    assert resumed["adapter"].keys() == full["adapter"].keys()
    for k, v in full["adapter"].items():
        assert torch.equal(resumed["adapter"][k], v), k
    moved = [k for k, v in full["adapter"].items() if v.is_floating_point() and not torch.equal(part["adapter"][k], v)]
    assert moved  # training after the stop did change the adapters


def toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.2), nn.Linear(10, 4))
    model = am.add_adapters(model, "aflora", ["0", "3"], r=2, train=())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    return model, opt, sched, am.AFLoRAFreezer(model, total_steps=20, t_init=2, t_final=5, window=2, optimizer=opt)


def train(model, opt, sched, freezer, steps):
    import random
    for _ in range(steps):
        x = torch.randn(4, 6) * random.random()
        model(x).square().mean().backward()
        freezer.step(), opt.step(), sched.step(), opt.zero_grad()


def test_checkpoint_holds_only_plain_data_and_restores_every_rng(tmp_path):
    import random
    np = pytest.importorskip("numpy")
    model, opt, sched, freezer = toy()
    train(model, opt, sched, freezer, 9)
    am.save_checkpoint(tmp_path / "c.pt", model, opt, sched, freezer, step=9, note="mid-run")
    state = torch.load(tmp_path / "c.pt", weights_only=True)  # no arbitrary objects inside
    assert {"adapter", "optimizer", "scheduler", "freezer", "rng", "extra"} <= set(state)
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    model2, opt2, sched2, freezer2 = toy()
    assert am.load_checkpoint(tmp_path / "c.pt", model2, opt2, sched2, freezer2) == {"step": 9, "note": "mid-run"}
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1] and np.random.rand() == expect[2]
    assert freezer2.frozen_at == freezer.frozen_at and sched2.last_epoch == sched.last_epoch
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad, n


def test_save_checkpoint_refuses_what_weights_only_cannot_load(tmp_path):
    model, opt, sched, freezer = toy()
    with pytest.raises(TypeError, match="weights_only"):
        am.save_checkpoint(tmp_path / "c.pt", model, extra_object=object())
    assert not (tmp_path / "c.pt").exists()
