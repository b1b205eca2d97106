"""Helper for tests/test_ddp.py: AFLoRA under DistributedDataParallel, gloo backend, CPU.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT_DIR
        trains with each DDP strategy below and writes OUT_DIR/rank<r>.pt
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT_DIR --bench
        times one training step under each strategy (interleaved repeats, medians), rank 0 prints

Strategies after a freeze event (a matrix's requires_grad turns False mid-run):
  rewrap       DDP(model) and, after every freezer.step() that froze something, rewrap_ddp(model)
  find_unused  DDP(model, find_unused_parameters=True) from the start, never rewrapped
  plain        DDP(model) kept as is: shows what breaks (recorded, not raised)
`train(strategy=None)` without torch.distributed is the single-process run on the same global batch.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import aflora_min as am  # noqa: E402

STEPS, GLOBAL_BATCH = 30, 16
STRATEGIES = ("rewrap", "find_unused", "plain")  # "plain" runs last: it leaves DDP's reducer broken
_BROKEN = []  # plain's wrappers, kept alive: destroying a reducer with an unfinished bucket can abort gloo


class MLP(nn.Module):
    def __init__(self, sizes=(16, 32, 24, 40), classes=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.classifier = nn.Linear(sizes[-1], classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.classifier(x)


def build():
    torch.manual_seed(0)
    model = am.add_adapters(MLP(), "aflora", ["layers.0", "layers.1", "layers.2"], r=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    freezer = am.AFLoRAFreezer(model, total_steps=STEPS, t_init=4, t_final=8, window=4, optimizer=opt)
    return model, opt, freezer


def batch(step, rank, world):
    """Step `step`'s global batch, this rank's shard of it (the same data whatever the world size)."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    shard = GLOBAL_BATCH // world
    return x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]


def grads_agree(model):
    """True if every gradient is bit-identical on all ranks."""
    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], t) for t in gathered)


def train(strategy=None):
    distributed = strategy is not None
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model, opt, freezer = build()
    wrapped = model
    if distributed:
        wrapped = DDP(model, find_unused_parameters=strategy == "find_unused")
    result = {"error": None, "error_step": None, "desync_steps": []}
    for step in range(STEPS):
        x, y = batch(step, rank, world)
        try:
            nn.functional.cross_entropy(wrapped(x), y).backward()
        except RuntimeError as e:
            result["error"], result["error_step"] = str(e)[:300], step
            break
        if distributed and not grads_agree(model):
            result["desync_steps"].append(step)
        if freezer.step() and strategy == "rewrap":
            wrapped = am.rewrap_ddp(wrapped)
        opt.step()
        opt.zero_grad()
    if strategy == "plain":
        _BROKEN.append(wrapped)
    result.update(frozen_at=dict(freezer.frozen_at), adapter=am.adapter_state_dict(model))
    return result


def disagree():
    """Rank 1 froze a matrix that rank 0 did not: rewrap_ddp must raise on every rank (not hang)."""
    model, _, _ = build()
    wrapped = DDP(model)
    if dist.get_rank() == 1:
        model.layers[0].lora_A.requires_grad_(False)
    try:
        am.rewrap_ddp(wrapped)
    except RuntimeError as e:
        return {"error": str(e)}
    return {"error": None}


# -------------------------------------------------------------------------------------------------
# --bench: the per-step cost of each strategy on a MiniLM-shaped BERT (random weights, no download)

def bench(out, steps_per_chunk=3, rounds=7, hidden=384, layers=6, batch_size=4, length=32):
    from transformers import BertConfig, BertForSequenceClassification
    rank = dist.get_rank()
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=12,
                     intermediate_size=4 * hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    model = am.add_adapters(BertForSequenceClassification(cfg), "aflora", targets, r=4).train()
    ids = torch.randint(0, cfg.vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(rank))
    labels = torch.zeros(batch_size, dtype=torch.long)
    adaptive = [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")) and p.requires_grad]

    def variants():
        return {"local (no DDP)": model,
                "DDP find_unused=False (rewrapped)": am.rewrap_ddp(DDP(model, init_sync=False)),
                "DDP find_unused=True": DDP(model, find_unused_parameters=True, init_sync=False),
                "DDP find_unused=True, skip_all_reduce_unused": DDP(
                    model, find_unused_parameters=True, init_sync=False, skip_all_reduce_unused_params=True)}

    def step(m):
        m(input_ids=ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    report = {}
    for phase in ("no matrix frozen", "every A, B frozen"):
        if phase == "every A, B frozen":
            for p in adaptive:
                p.requires_grad_(False)
        wrapped = variants()
        times = {k: [] for k in wrapped}
        for name in wrapped:  # warm-up (also builds DDP's buckets)
            step(wrapped[name]), step(wrapped[name])
        for r in range(rounds):
            names = list(wrapped)
            names = names[r % len(names):] + names[:r % len(names)]  # interleaved, rotating order
            for name in names:
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(steps_per_chunk):
                    step(wrapped[name])
                times[name].append((time.perf_counter() - t0) / steps_per_chunk * 1e3)
        ref = times["DDP find_unused=False (rewrapped)"]  # paired per-round differences cancel load drift
        report[phase] = {k: (statistics.median(v), statistics.median(a - b for a, b in zip(v, ref)))
                         for k, v in times.items()}
        del wrapped
    rewrap = {}
    ddp = DDP(model)
    for init_sync in (False, True):
        ts = []
        for _ in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            ddp = am.rewrap_ddp(ddp, init_sync=init_sync)
            ts.append((time.perf_counter() - t0) * 1e3)
        rewrap[f"rewrap_ddp(init_sync={init_sync})"] = statistics.median(ts)
    if rank == 0:
        print(f"torch {torch.__version__}, gloo, {dist.get_world_size()} ranks x {torch.get_num_threads()} thread, "
              f"BERT hidden {hidden} x {layers} layers, AFLoRA r=4 on six targets, batch {batch_size} x {length} "
              f"per rank, median of {rounds} interleaved rounds of {steps_per_chunk} steps (forward + backward)")
        print(f"  {'':20s} {'':48s} {'ms/step':>8s} {'vs find_unused=False (paired median)':>38s}")
        for phase, row in report.items():
            for name, (ms, diff) in row.items():
                print(f"  {phase:20s} {name:48s} {ms:8.1f} {diff:+18.1f} ms")
        for name, ms in rewrap.items():
            print(f"  one-off cost of {name:38s} {ms:8.1f} ms")
        settings = {"torch": torch.__version__, "backend": "gloo", "world_size": dist.get_world_size(),
                    "threads_per_rank": torch.get_num_threads(), "hidden": hidden, "layers": layers,
                    "batch_per_rank": batch_size, "length": length, "rounds": rounds,
                    "steps_per_chunk": steps_per_chunk, "command": " ".join(["tests/_ddp_worker.py"] + sys.argv[1:])}
        records = [{"phase": phase, "strategy": name, "step_ms": ms, "paired_diff_ms": diff}
                   for phase, row in report.items() for name, (ms, diff) in row.items()]
        records += [{"phase": "one-off", "strategy": name, "step_ms": ms} for name, ms in rewrap.items()]
        with open(os.path.join(out, "ddp_cpu.json"), "w") as f:
            json.dump({"settings": settings, "records": records}, f, indent=1)


def main():
    torch.set_num_threads(1)
    out = sys.argv[1]
    dist.init_process_group("gloo")
    if "--bench" in sys.argv:
        kw = {a.split("=")[0][2:]: int(a.split("=")[1]) for a in sys.argv[2:] if "=" in a}
        bench(out, **kw)
    else:
        results = {s: train(s) for s in STRATEGIES if s != "plain"}
        results["disagree"] = disagree()
        results["plain"] = train("plain")
        torch.save(results, os.path.join(out, f"rank{dist.get_rank()}.pt"))
        dist.barrier()  # both ranks saved
        # The "plain" run left a DDP reducer with a bucket that never finished. Tearing that down (or the
        # process group under it) can make gloo call std::terminate (seen once in CI: SIGABRT on exit), so
        # this run skips the teardown: every result is on disk, nothing else is pending.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
