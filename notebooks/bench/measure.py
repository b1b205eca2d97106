"""Measurements of cost, not accuracy: what the grid would cost (plan), padded tokens (padding), which
path ELoRA takes (paths), one 2-thread process against two 1-thread ones (threads), and the step time
of every configuration timed side by side (speed). Each writes its own results file."""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import protocol as P
from bench.protocol import (CPU_EPOCHS, CPU_MAX_STEPS, FULL_EPOCHS, HERE, METHODS, REPO, SEEDS, SPEED_NAMES,
                            TASKS, _load_task, adapter_trainable, am, device_info, grid_settings,
                            helpers, write_records)

build_model = P.build_model     # patched by tests

# ------------------------------------------------------------------------------------------------
# Planning the grid: what would it cost on this machine?


def run_plan(tasks=TASKS, methods=METHODS, epochs=None, autocasts=(None, "bf16"), n_batches=6,
             out_path=None, device="cpu", log=print) -> list[dict]:
    """Estimate each (task, method, dtype) run's time before any run: build the grid's length-grouped
    loader (batch 32, length 128) over the whole training set, time one training step (forward,
    backward, clip, AdamW) on `n_batches` batches at evenly spaced quantiles of their padded size,
    and one dev evaluation; estimate = mean step x steps + evaluation x epochs. Methods and dtypes
    are interleaved per batch. Records: task, method, autocast, step_ms (mean over the sampled
    batches), eval_s, steps, est_s, threads."""
    device = torch.device(device)
    records = []
    for task in tasks:
        task = helpers.task_name(task)
        n_ep = (epochs or FULL_EPOCHS)[task]
        settings = grid_settings(task, "full")
        train_ex, dev_ex = _load_task(task, settings)
        models = {}
        for m in methods:
            model, tok = build_model(m, task, device, seed=0)
            params = [p for p in model.parameters() if p.requires_grad]
            models[m] = (model, torch.optim.AdamW(params, lr=1e-5))
        loader = helpers.make_loader(tok, train_ex, 32, 128, group_by_length=True, seed=0)
        batches = sorted(loader, key=lambda b: b["attention_mask"].numel())
        picks = [batches[round(q * (len(batches) - 1) / max(1, n_batches - 1))] for q in range(n_batches)]
        dev_loader = helpers.make_loader(tok, dev_ex, 128, 128)
        times = {(m, a): [] for m in methods for a in autocasts}
        for i, batch in enumerate([picks[-1]] + picks):          # the first (largest) one warms up
            for m in methods:
                model, opt = models[m]
                for a in autocasts:
                    amp = torch.autocast(device.type, dtype=torch.bfloat16) if a else contextlib.nullcontext()
                    t0 = time.perf_counter()
                    with amp:
                        loss = model(**batch).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if i:
                        times[(m, a)].append(time.perf_counter() - t0)
        for m in methods:
            t0 = time.perf_counter()
            helpers.evaluate(models[m][0], dev_loader, task, device)
            eval_s = time.perf_counter() - t0
            for a in autocasts:
                step_s = statistics.mean(times[(m, a)])
                rec = dict(task=task, method=m, autocast=a or "fp32", epochs=n_ep, steps=n_ep * len(loader),
                           step_ms=1000 * step_s, eval_s=eval_s, est_s=step_s * n_ep * len(loader) + eval_s * n_ep,
                           sampled_padded_tokens=[int(b["attention_mask"].numel()) for b in picks],
                           **device_info(device))
                records.append(rec)
                log(f"{task:6s} {m:7s} {rec['autocast']:5s} step {rec['step_ms']:7.1f} ms  eval {eval_s:5.1f} s  "
                    f"x {rec['steps']} steps -> {rec['est_s'] / 60:6.1f} min")
    if out_path is not None:
        write_records(out_path, records)
    return records


def run_padding(out_path=None, log=print) -> list[dict]:
    """Real and padded tokens per method and seed with random batches and with length-grouped ones
    (MiniLM's tokenizer, batch 32, length 128), over the reference and the CPU protocol's epochs."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(helpers._model_path())
    records = []
    for task in TASKS:
        train = helpers.load_glue(task, "train")
        for protocol, epochs, max_steps in (("reference", FULL_EPOCHS[task], None),
                                            ("cpu", CPU_EPOCHS[task], CPU_MAX_STEPS.get(task))):
            rec = dict(task=task, protocol=protocol, epochs=epochs, max_steps=max_steps)
            for grouped in (False, True):
                loader = helpers.make_loader(tok, train, 32, 128, shuffle=True, seed=0, group_by_length=grouped)
                real = padded = steps = 0
                for _ in range(epochs):
                    for batch in loader:
                        if max_steps is not None and steps >= max_steps:
                            break
                        real += int(batch["attention_mask"].sum())
                        padded += batch["attention_mask"].numel()
                        steps += 1
                rec["grouped" if grouped else "random"] = dict(real=real, padded=padded, steps=steps)
            records.append(rec)
            log(f"{task:6s} {protocol:9s} real {rec['random']['real'] / 1e6:6.2f}M  padded: random "
                f"{rec['random']['padded'] / 1e6:6.2f}M, grouped {rec['grouped']['padded'] / 1e6:6.2f}M")
    for protocol in ("reference", "cpu"):
        rs = [r for r in records if r["protocol"] == protocol]
        log(f"{protocol}: padded tokens per method and seed: random {sum(r['random']['padded'] for r in rs) / 1e6:.1f}M, "
            f"grouped {sum(r['grouped']['padded'] for r in rs) / 1e6:.1f}M (real {sum(r['random']['real'] for r in rs) / 1e6:.1f}M)")
    if out_path is not None:
        write_records(out_path, [dict(r, command=P.COMMAND) for r in records])
    return records


def run_paths(out_path=None, seeds=SEEDS, log=print) -> list[dict]:
    """Which path ELoRA's `path="auto"` took in the grid's training steps. For every training batch of
    the CPU protocol (length-grouped, batch 32, length 128, each seed's order), each ELoRA r=1024 layer
    of MiniLM asks `choose_path` (the library's own rule, fp32), so the shares are exact, not modelled:
    the share of layer-steps on the weight path, and the token threshold per layer shape."""
    model, tok = build_model("elora", "SST-2", torch.device("cpu"))
    per_shape, count = {}, {}                            # (in, out): one layer of that shape, how many
    for _, m in am.adapter_layers(model):                # every adapter here is an ELoRALinear
        sh = (m.in_features, m.out_features)
        per_shape.setdefault(sh, m)
        count[sh] = count.get(sh, 0) + 1
    shapes = sorted(per_shape)
    cache = {}

    def path(sh, n):                                     # one (n, in) input of n tokens
        if (sh, n) not in cache:
            cache[sh, n] = per_shape[sh].choose_path(torch.empty(n, sh[0]))
        return cache[sh, n]

    threshold = {sh: next(n for n in range(1, 1 << 16) if path(sh, n) == "weight") for sh in shapes}
    records = []
    for task in TASKS:
        train = helpers.load_glue(task, "train")
        weight = {sh: 0 for sh in shapes}
        steps = 0
        for seed in seeds:
            loader = helpers.make_loader(tok, train, 32, 128, shuffle=True, seed=seed, group_by_length=True)
            done = 0
            for _ in range(CPU_EPOCHS[task]):
                for batch in loader:
                    if done >= CPU_MAX_STEPS.get(task, math.inf):
                        break
                    n = batch["input_ids"].numel()
                    for sh in shapes:
                        weight[sh] += path(sh, n) == "weight"
                    done += 1
            steps += done
        layer_steps = sum(count.values()) * steps
        rec = dict(task=task, seeds=list(seeds), steps=steps, layers=sum(count.values()),
                   shapes={f"{i}x{o}": dict(layers=count[(i, o)], weight_from_tokens=threshold[(i, o)],
                                            weight_steps=weight[(i, o)]) for i, o in shapes},
                   weight_share=sum(weight[sh] * count[sh] for sh in shapes) / layer_steps)
        records.append(rec)
        log(f"{task:6s} {steps} steps over {len(seeds)} seeds: {100 * rec['weight_share']:.0f}% of ELoRA's "
            "layer-steps on the weight path (" + ", ".join(f"{k}: {v['weight_steps'] / steps:.0%} of steps, from "
                                                           f"{v['weight_from_tokens']} tokens"
                                                           for k, v in rec["shapes"].items()) + ")")
    if out_path is not None:
        write_records(out_path, [dict(r, command=P.COMMAND) for r in records])
    return records


def _thread_worker(threads: int, steps: int, seed: int = 0) -> float:
    """Seconds per LoRA training step of MiniLM on a fixed batch (32 x 64 tokens) at `threads` threads."""
    torch.set_num_threads(threads)
    helpers.setup(seed)
    torch.set_num_threads(threads)
    model, _ = build_model("lora", "SST-2", torch.device("cpu"), seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = speed_batch(32, 64, torch.device("cpu"), seed)
    model.train()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_threads(out_path=None, steps=12, rounds=3, log=print) -> dict:
    """Throughput of one 2-thread process against two 1-thread processes running at once (the grid's
    choice), alternated `rounds` times; each process pins its threads through OMP_NUM_THREADS."""
    import subprocess
    code = ("import sys; sys.path[:0] = [{!r}, {!r}]; from bench import measure; "
            "print(measure._thread_worker({}, {}))")
    def launch(threads):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return subprocess.Popen([sys.executable, "-c", code.format(str(HERE), str(REPO), threads, steps)],
                                env=env, stdout=subprocess.PIPE, text=True)
    one, two = [], []
    for r in range(rounds):
        p = launch(2)
        one.append(1 / float(p.communicate()[0].split()[-1]))
        ps = [launch(1), launch(1)]
        two.append(sum(1 / float(q.communicate()[0].split()[-1]) for q in ps))
        log(f"round {r + 1}/{rounds}: one 2-thread process {one[-1]:.2f} steps/s, two 1-thread processes {two[-1]:.2f} steps/s")
    rec = dict(one_process_2_threads_steps_per_s=statistics.median(one),
               two_processes_1_thread_steps_per_s=statistics.median(two), rounds=rounds, steps=steps,
               batch="32 x 64 tokens, MiniLM + LoRA r=8, forward + backward + AdamW", **device_info("cpu"))
    rec["ratio"] = rec["two_processes_1_thread_steps_per_s"] / rec["one_process_2_threads_steps_per_s"]
    log(f"two 1-thread processes / one 2-thread process: {rec['ratio']:.2f}x the throughput")
    if out_path is not None:
        write_records(out_path, [rec])
    return rec


# ------------------------------------------------------------------------------------------------
# Speed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(model, optimizer=None, freezer=None) -> int:
    """Bytes of the persistent tensors one configuration owns: parameters, buffers (shared storage
    counted once), optimizer state and the freezer's score tensors."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    if freezer is not None:
        tensors += [t for d in (freezer.ipt_sum, freezer.exp_avg_ipt, freezer.exp_avg_unc) for t in d.values()]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def build_speed_configs(device, names=SPEED_NAMES, task="SST-2", seed=0) -> dict:
    """Every configuration of the speed benchmark, built once: {name: dict(model, optimizer, freezer,
    params, description)}. Trainable everywhere: the classifier plus the adapter."""
    device = torch.device(device)
    configs, skipped = {}, {}
    wanted = set(names)

    def add(name, model, description, freezer=None):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)  # the rate does not change the time
        if freezer is not None:
            freezer.optimizer = opt
        configs[name] = dict(model=model, optimizer=opt, freezer=freezer, params=adapter_trainable(model),
                             description=description)

    helpers.setup(seed)
    if "floor" in wanted:
        model, _ = helpers.load_model(task, device)
        for n, p in model.named_parameters():
            p.requires_grad_("classifier" in n)
        # The word-embedding output requires grad, so backward computes the activation gradient through
        # every layer (embedding LayerNorm, all 6 encoder layers, pooler) but no weight gradient: the
        # least any adapter on layer 0 must do. Only the classifier trains.
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        add("floor", model, "frozen base, no adapter; backward through every layer (embedding output "
                            "requires grad), classifier trained")
    peft_configs = (("peft_lora8", "peft_lora", "HF PEFT LoraConfig(r=8, lora_alpha=8, lora_dropout=0) "
                                                "on the six linears, task_type SEQ_CLS"),
                    ("peft_vera1024", "peft_vera", "HF PEFT VeraConfig(r=1024, d_initial=0.1, vera_dropout=0) "
                                                   "on the six linears, one shared sliced projection pair, "
                                                   "task_type SEQ_CLS"))
    for name, method, description in peft_configs:
        if name in wanted:
            try:
                add(name, build_model(method, task, device, seed)[0], description)
            except Exception as err:  # noqa: BLE001  (an old or missing peft must not cost the other numbers)
                skipped[name] = f"{type(err).__name__}: {err}"
    if "lora8" in wanted:
        add("lora8", build_model("lora", task, device, seed)[0], "aflora_min LoRA r=8 on the six linears")
    if "elora1024" in wanted:
        add("elora1024", build_model("elora", task, device, seed)[0],
            "aflora_min ELoRA r=1024 on the six linears (a random pair per layer), path='auto' (what the "
            "grid runs; at this batch every layer takes the weight path: one matmul with W0 + ΔW)")
    if "elora1024_token" in wanted:
        model = build_model("elora", task, device, seed)[0]
        for _, layer in am.adapter_layers(model):
            layer.path = "token"
        add("elora1024_token", model, "aflora_min ELoRA r=1024, path='token' forced (every token through "
                                      "A and B, as PEFT's VeRA and the AFLoRA authors' ELoRA compute it)")
    if "aflora4_start" in wanted or "freezer_overhead" in wanted:
        model = build_model("aflora", task, device, seed)[0]
        # A schedule that never freezes (rho stays ~1) but closes a window and takes the quantile every
        # 10 steps, so the measured freezer cost includes scoring and the freezing decision.
        freezer = am.AFLoRAFreezer(model, total_steps=10**9, t_init=0, t_final=0)
        add("aflora4_start", model, "aflora_min AFLoRA r=4 at the start (FFN A, B trainable); the "
                                    "freezer.step() time is excluded here and reported as freezer_overhead",
            freezer=freezer)
    if "aflora4_frozen" in wanted:
        model = build_model("aflora", task, device, seed)[0]
        for _, layer in am.adapter_layers(model):
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
        add("aflora4_frozen", model, "aflora_min AFLoRA r=4 once every A and B is frozen (only d, b train)")
    for cfg in configs.values():
        cfg["model"].train()
    for name, error in skipped.items():
        configs[name] = dict(error=error)
    return configs


def _timed_step(cfg, batch, device) -> tuple[float, float, float]:
    """One training step; returns (step s without the freezer, forward+backward s, freezer s)."""
    model, opt, freezer = cfg["model"], cfg["optimizer"], cfg["freezer"]
    _sync(device)
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    _sync(device)
    t1 = time.perf_counter()
    f = 0.0
    if freezer is not None:
        freezer.step()
        _sync(device)
        f = time.perf_counter() - t1
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    t3 = time.perf_counter()
    return (t1 - t0) + (t3 - t2), t1 - t0, f


def speed_batch(batch: int, length: int, device, seed: int = 0) -> dict:
    """A fixed batch of random token ids, every row exactly `length` tokens (no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                token_type_ids=torch.zeros_like(ids).to(device),
                labels=torch.randint(0, 2, (batch,), generator=g).to(device))


def run_speed(out_path=None, batch=64, length=128, warmup=None, rounds=None, steps_per_round=None,
              device=None, names=SPEED_NAMES, log=print) -> list[dict]:
    """Median training-step time and peak memory of every configuration, measured in one process.

    All configurations are built first. Each gets `warmup` untimed steps, then `rounds` rounds visit
    the configurations in turn (the order rotates every round), each doing `steps_per_round` timed
    steps; a configuration's step_ms is the median over its rounds x steps_per_round steps.
    A step: forward + backward + AdamW step + zero_grad (the device synchronised before and after).
    freezer_overhead: AFLoRAFreezer.step() timed separately inside the aflora4_start steps; step_ms is
    its mean per step (amortised over its 10-step window, which the median would hide), pct_of_step
    that mean over aflora4_start's median step. peak_mib (CUDA only; null on a CPU): the configuration's
    own persistent tensors (weights, buffers, optimizer state) plus the largest transient allocation
    of its steps, so the other resident configurations do not count. params: trainable parameters
    excluding the classifier.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    warmup = (10 if cuda else 1) if warmup is None else warmup
    rounds = (10 if cuda else 5) if rounds is None else rounds
    steps_per_round = (5 if cuda else 2) if steps_per_round is None else steps_per_round
    if out_path is not None:
        out_path = Path(out_path)
    t_build = time.perf_counter()
    configs = build_speed_configs(device, names)
    failed = {n: c["error"] for n, c in configs.items() if "error" in c}
    configs = {n: c for n, c in configs.items() if "error" not in c}
    for n, e in failed.items():
        log(f"{n}: not built, not timed ({e})")
    log(f"built {len(configs)} configurations in {time.perf_counter() - t_build:.1f} s; batch {batch}, "
        f"length {length}, {warmup} warm-up steps, {rounds} rounds x {steps_per_round} steps, {device}")
    data = speed_batch(batch, length, device)
    times = {n: [] for n in configs}
    fwd = {n: [] for n in configs}
    freezer_times = []
    peak = {n: None for n in configs}
    for name, cfg in configs.items():
        for _ in range(warmup):
            _timed_step(cfg, data, device)
    order = list(configs)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            cfg = configs[name]
            if cuda:
                _sync(device)
                own = _tensor_bytes(cfg["model"], cfg["optimizer"], cfg["freezer"])
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps_per_round):
                step, fb, f = _timed_step(cfg, data, device)
                times[name].append(step)
                fwd[name].append(fb)
                if cfg["freezer"] is not None:
                    freezer_times.append(f)
            if cuda:
                mib = (torch.cuda.max_memory_allocated(device) - base + own) / 2**20
                peak[name] = mib if peak[name] is None else max(peak[name], mib)
        log(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n} {1000 * statistics.median(times[n]):.1f}"
                                                      for n in configs))
    info = device_info(device)
    common = dict(batch=batch, length=length, warmup=warmup, rounds=rounds, steps_per_round=steps_per_round,
                  timed="forward+backward+AdamW step+zero_grad, median over rounds x steps",
                  peak_note=None if cuda else "peak memory is measured on CUDA only (null on a CPU)",
                  weights=P.weights_label(), **info)
    records = []
    for name in (n for n in SPEED_NAMES if n in configs or n in failed):
        if name in failed:
            records.append(dict(name=name, step_ms=None, peak_mib=None, params=None, error=failed[name], **common))
            continue
        ts = sorted(times[name])
        records.append(dict(name=name, step_ms=1000 * statistics.median(ts),
                            peak_mib=None if peak[name] is None else round(peak[name], 1),
                            params=configs[name]["params"], fwd_bwd_ms=1000 * statistics.median(fwd[name]),
                            p10_ms=1000 * _quantile(ts, 0.1), p90_ms=1000 * _quantile(ts, 0.9), n=len(ts),
                            description=configs[name]["description"], **common))
    if "freezer_overhead" in names and freezer_times:
        start = next(r for r in records if r["name"] == "aflora4_start")
        mean_ms = 1000 * statistics.mean(freezer_times)
        fz = configs["aflora4_start"]["freezer"]
        records.append(dict(name="freezer_overhead", step_ms=mean_ms, peak_mib=None,
                            params=sum(p.numel() for p in fz.params.values()),
                            median_ms=1000 * statistics.median(freezer_times),
                            max_ms=1000 * max(freezer_times), pct_of_step=100 * mean_ms / start["step_ms"],
                            n=len(freezer_times),
                            description="AFLoRAFreezer.step() per training step of aflora4_start (mean, "
                                        "window closes and quantile decisions included; params: the "
                                        "matrices it scores)", **common))
    if out_path is not None:
        write_records(out_path, records)
    log(format_speed(records))
    return records


def _quantile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    i = q * (len(sorted_values) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (i - lo)


def format_speed(records) -> str:
    lines = [f"{'name':18s} {'step ms':>9s} {'fwd+bwd':>9s} {'peak MiB':>9s} {'params':>9s}"]
    for r in records:
        if r["step_ms"] is None:
            lines.append(f"{r['name']:18s} not measured: {r.get('error', '')}")
            continue
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        fb = f"{r['fwd_bwd_ms']:.1f}" if "fwd_bwd_ms" in r else "-"
        extra = f"  ({r['pct_of_step']:.2f}% of a step)" if "pct_of_step" in r else ""
        lines.append(f"{r['name']:18s} {r['step_ms']:9.2f} {fb:>9s} {peak:>9s} {r['params']:9,d}{extra}")
    return "\n".join(lines)


