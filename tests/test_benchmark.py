"""Unit tests of notebooks/benchmark.py's logic (no model is trained or timed here)."""
import json
import math

import pytest

import aflora_min as am
import benchmark as bm


def test_learning_rates_follow_the_documented_choice():
    assert bm.learning_rates("lora", "rte") == (5e-4, 5e-4)
    assert bm.learning_rates("peft_lora", "CoLA") == (5e-4, 5e-4)
    for method in ("elora", "aflora", "peft_vera"):
        assert bm.learning_rates(method, "STS-B") == (2e-2, 4e-3)
        assert bm.learning_rates(method, "SST-2") == (4e-3, 4e-3)
    with pytest.raises(ValueError, match="unknown method"):
        bm.learning_rates("adalora", "RTE")


def test_grid_settings_full_fast_and_overrides():
    full = bm.grid_settings("mrpc", "full")
    assert (full["epochs"], full["batch_size"], full["max_length"], full["train_limit"]) == (20, 32, 128, None)
    assert bm.grid_settings("SST-2", "full")["epochs"] == 1
    fast = bm.grid_settings("CoLA", "fast", epochs=3, train_limit=None)
    assert fast["epochs"] == 3 and fast["train_limit"] == 48  # None keeps the mode's value
    with pytest.raises(ValueError, match="unknown settings"):
        bm.grid_settings("RTE", "full", lr=1)
    with pytest.raises(ValueError, match="mode"):
        bm.grid_settings("RTE", "medium")


@pytest.mark.parametrize("epochs,per_epoch,expected", [
    (20, 100, (100, 1400)),    # released code: 1 + 14 of 20 epochs
    (10, 100, (100, 700)),     # released code: 1 + 7 of 10 epochs
    (1, 2105, (210, 1474)),    # SST-2, one epoch: 10% warm-up
])
def test_aflora_schedule_reproduces_the_released_fractions(epochs, per_epoch, expected):
    assert bm.aflora_schedule(epochs * per_epoch, per_epoch) == expected


@pytest.mark.parametrize("total", [2, 3, 5, 8, 12, 97])
def test_aflora_schedule_is_always_valid_for_the_freezer(total):
    t_init, t_final = bm.aflora_schedule(total, max(1, total // 2))
    assert 0 <= t_init and 0 <= t_final and t_init + t_final < total
    am.cubic_schedule(0, total, t_init, t_final)  # raises if invalid


def test_records_round_trip_and_append(tmp_path):
    path = tmp_path / "sub" / "r.json"
    assert bm.read_records(path) == []
    bm.append_record(path, {"a": 1})
    bm.append_record(path, {"a": 2})
    assert bm.read_records(path) == [{"a": 1}, {"a": 2}]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="list"):
        bm.read_records(path)


def _rec(task, method, seed, best, params, wall, **extra):
    return dict(task=task, method=method, seed=seed, metric="acc", best=best, last=best,
                trainable_params_avg=params, wall_s=wall, device="cuda", mode="full", **extra)


def test_grid_resumes_and_writes_each_run_at_once(tmp_path, monkeypatch):
    calls = []

    def fake_train_one(task, method, seed, settings, device, train_ex=None, dev_ex=None, log_every=None):
        calls.append((task, method, seed))
        # the file already holds every earlier run when the next one starts
        assert len(bm.read_records(out)) == len(calls)  # one record was there before the grid
        return _rec(task, method, seed, 0.5, 10, 1.0)

    monkeypatch.setattr(bm, "train_one", fake_train_one)
    monkeypatch.setattr(bm, "_load_task", lambda task, settings, seed=0: ([], []))
    out = tmp_path / "grid.json"
    bm.append_record(out, _rec("RTE", "lora", 0, 0.6, 10, 1.0))
    written = bm.run_glue_grid(["RTE"], ["lora", "aflora"], [0, 1], "full", out, device="cpu", log=None)
    assert calls == [("RTE", "aflora", 0), ("RTE", "lora", 1), ("RTE", "aflora", 1)]
    assert len(written) == 3 and len(bm.read_records(out)) == 4
    assert all(not bm.missing_fields(r) for r in bm.read_records(out))
    calls.clear()
    bm.run_glue_grid(["RTE"], ["lora", "aflora"], [0, 1], "full", out, device="cpu", log=None)
    assert calls == []  # everything done: nothing reruns


def test_grid_stops_before_the_time_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "_load_task", lambda task, settings, seed=0: ([], []))
    monkeypatch.setattr(bm, "train_one", lambda task, method, seed, *a, **k: _rec(task, method, seed, 0.5, 10, 600.0))
    out = tmp_path / "grid.json"
    written = bm.run_glue_grid(["RTE"], ["lora", "elora"], [0], "fast", out, device="cpu", max_minutes=5, log=None)
    assert len(written) == 1  # the first run "took" 10 minutes: the second would not fit


def test_summarize_and_targets_from_results():
    glue = []
    for task in ("RTE", "MRPC"):
        for seed in (0, 1):
            glue += [_rec(task, "lora", seed, 0.70, 331_776, 100.0),
                     _rec(task, "elora", seed, 0.69, 57_600, 200.0),
                     _rec(task, "aflora", seed, 0.71, 34_000, 90.0)]
    s = bm.summarize_glue(glue)
    assert list(s) == ["lora", "elora", "aflora"]
    assert s["aflora"]["mean"] == pytest.approx(0.71) and s["lora"]["wall_s"] == 400.0
    assert s["lora"]["n"] == {"MRPC": 2, "RTE": 2} and s["lora"]["sd"]["RTE"] == 0.0
    assert bm.complete_tasks(glue) == ["MRPC", "RTE"]
    assert bm.complete_tasks(glue[:-1]) == ["RTE"]                     # MRPC seed 1 misses AFLoRA
    speed = [dict(name="floor", step_ms=10.0), dict(name="peft_lora8", step_ms=20.0),
             dict(name="lora8", step_ms=19.0), dict(name="peft_vera1024", step_ms=50.0),
             dict(name="elora1024", step_ms=60.0), dict(name="aflora4_frozen", step_ms=11.9),
             dict(name="freezer_overhead", step_ms=0.5, pct_of_step=4.0)]
    rows = {r["target"]: r["status"] for r in bm.targets(glue, speed, "g", "s")}
    assert list(rows.values()) == ["met", "met", "met", "not measured yet", "met", "missed", "missed", "met",
                                   "missed"]
    rows = bm.targets(None, None)
    assert len(rows) == 9 and {r["status"] for r in rows} == {"not measured yet"}
    assert "not measured yet" in bm.format_targets(rows)


def test_aflora_param_ratio_is_part_of_the_accuracy_target():
    glue = [_rec("RTE", "lora", 0, 0.70, 331_776, 1.0), _rec("RTE", "aflora", 0, 0.71, 100_000, 1.0)]
    first = bm.targets(glue, None)[0]
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
    text = bm.format_speed(recs)
    assert "floor" in text and "1.00% of a step" in text


def test_speed_reports_a_peft_config_it_cannot_build(tmp_path, monkeypatch):
    """An old or missing peft on the GPU image must not cost the other numbers."""
    real = bm.build_model

    def build(method, *args, **kwargs):
        if method.startswith("peft_"):
            raise ImportError("no peft here")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(bm, "build_model", build)
    recs = bm.run_speed(tmp_path / "speed_cpu.json", batch=2, length=8, warmup=0, rounds=1,
                        steps_per_round=1, device="cpu", names=("floor", "peft_lora8"), log=lambda s: None)
    by = {r["name"]: r for r in recs}
    assert by["floor"]["step_ms"] > 0 and by["floor"]["params"] == 0 and by["floor"]["peak_mib"] is None
    assert by["peft_lora8"]["step_ms"] is None and "no peft here" in by["peft_lora8"]["error"]
    assert bm.read_records(tmp_path / "speed_cpu.json") == recs
    rows = {r["target"]: r["status"] for r in bm.targets(None, recs)}
    assert rows["our LoRA r=8 step <= PEFT LoRA r=8"] == "not measured yet"
    assert "not measured" in bm.format_speed(recs)


# ---------------------------------------------------------------------------------------------
# The CPU grid: learning-rate search on held-out data, then the grid, several resumable workers

def test_cpu_protocol_and_job_order():
    s = bm.grid_settings("SST-2", "cpu")
    assert (s["epochs"], s["max_steps"], s["group_by_length"], s["batch_size"]) == (1, 625, True, 32)
    assert [bm.grid_settings(t, "cpu")["epochs"] for t in bm.TASKS] == [5, 1, 5, 5, 3]
    jobs = bm.cpu_jobs()
    search = [j for j in jobs if j["kind"] == "lr_search"]
    grid = [j for j in jobs if j["kind"] == "grid"]
    assert len(search) == 3 * 2 * 3 and len(grid) == 45 and jobs[:len(search)] == search
    assert all(j["split"] == "heldout" and j["task"] in bm.LR_SEARCH_TASKS for j in search)
    assert [j["seed"] for j in grid] == sorted(j["seed"] for j in grid)      # whole seeds first
    assert len({bm._job_name(j) for j in jobs}) == len(jobs)


def test_heldout_split_is_disjoint_and_never_the_dev_set():
    s = bm.grid_settings("RTE", "cpu")
    train, held = bm._load_task("RTE", s, split="heldout")
    full, dev = bm._load_task("RTE", s)
    assert len(train) + len(held) == len(full) and len(held) == round(0.1 * len(full))
    key = lambda e: (e["text_a"], e["text_b"])
    assert not {key(e) for e in train} & {key(e) for e in held}
    assert {key(e) for e in held} <= {key(e) for e in full}
    assert bm._load_task("RTE", s, split="heldout")[1] == held               # fixed seed


def test_lr_choice_uses_the_mean_heldout_score_and_only_complete_searches():
    recs = [dict(task=t, method=m, lr_factor=f, best=b, seed=0, mode="cpu")
            for m, scores in (("lora", {1 / 3: (0.8, 0.7), 1.0: (0.85, 0.8), 3.0: (0.9, 0.5)}),
                              ("elora", {1 / 3: (0.8, 0.8), 1.0: (0.8, 0.8), 3.0: (0.9, 0.9)}))
            for f, bs in scores.items() for t, b in zip(bm.LR_SEARCH_TASKS, bs)]
    recs += [dict(task="SST-2", method="aflora", lr_factor=1.0, best=0.9, seed=0, mode="cpu")]
    assert bm.choose_lr_factors(recs) == {"lora": 1.0, "elora": 3.0}
    tie = [dict(r, best=0.5) for r in recs if r["method"] == "lora"]
    assert bm.choose_lr_factors(tie) == {"lora": 1.0}                        # ties: closest to 1
    table = bm.lr_search_table(recs)
    assert "0.8250" in table and table.count("<-") == 2


def test_cpu_grid_runs_resumes_and_never_reruns(tmp_path):
    """Two 1-thread workers on a tiny slice: the search, then the grid job, which waits for it."""
    override = dict(train_limit=40, dev_limit=16, epochs=2, max_steps=None, batch_size=8, max_length=32)
    lines = []
    ok = bm.run_cpu_grid(workers=2, seeds=(0,), methods=("lora",), tasks=("RTE",), poll_s=0.5,
                         report_s=0, nice=0, results_dir=tmp_path, override=override, log=lines.append)
    assert ok and lines[-1] == "cpu grid complete", "\n".join(lines)
    search, grid = bm.read_records(tmp_path / "lr_search_cpu.json"), bm.read_records(tmp_path / "glue_cpu.json")
    assert len(search) == 6 and len(grid) == 1
    assert grid[0]["lr_factor"] == bm.choose_lr_factors(search)["lora"]
    assert all(r["threads"] == 1 and r["split"] == "heldout" and r["dev_size"] == 4 for r in search)
    for key in ("task", "method", "seed", "lr", "head_lr", "best", "last", "dev_history",
                "trainable_params_avg", "steps", "wall_s", "cpu_s", "device", "threads", "dtype", "torch", "command"):
        assert key in grid[0], key
    assert not list((tmp_path / "work").glob("*.pt"))                         # checkpoints removed
    before = (tmp_path / "glue_cpu.json").read_text()
    assert bm.run_cpu_grid(workers=2, seeds=(0,), methods=("lora",), tasks=("RTE",), poll_s=0.5, nice=0,
                           results_dir=tmp_path, override=override, log=lines.append)
    assert (tmp_path / "glue_cpu.json").read_text() == before                # nothing rerun


@pytest.mark.parametrize("method", ["aflora", "elora"])
def test_a_job_stopped_after_an_epoch_resumes_to_the_same_record(tmp_path, method):
    override = dict(train_limit=48, dev_limit=16, epochs=3, max_steps=None, batch_size=8, max_length=32)
    job = dict(kind="lr_search", task="RTE", method=method, seed=0, lr_factor=1.0, split="heldout")
    bm.set_results_dir(tmp_path / "a")
    try:
        whole = bm.run_job(job, log=lambda s: None, **override)

        class Stop(Exception):
            pass

        def stop_after_epoch_2(line):
            if line.startswith("epoch 2/3"):
                raise Stop
        bm.set_results_dir(tmp_path / "b")
        with pytest.raises(Stop):
            bm.run_job(job, log=stop_after_epoch_2, **override)
        assert not bm.read_records(bm.LR_SEARCH_CPU) and list(bm.WORK.glob("*.pt"))
        resumed = bm.run_job(job, log=lambda s: None, **override)
    finally:
        bm.set_results_dir(bm.RESULTS)
    assert resumed["resumed_from_epoch"] == 2 and whole["resumed_from_epoch"] == 0
    for key in ("best", "last", "dev_history", "steps", "trainable_params_avg", "frozen_at", "dev_final"):
        assert resumed.get(key) == whole.get(key), key


def test_a_search_record_never_counts_as_the_grid_run_of_the_same_task_method_seed():
    search = dict(task="SST-2", method="lora", seed=0, mode="cpu", kind="lr_search", lr_factor=1.0)
    grid_job = next(j for j in bm.cpu_jobs() if j["kind"] == "grid" and j["task"] == "SST-2"
                    and j["method"] == "lora" and j["seed"] == 0)
    search_job = next(j for j in bm.cpu_jobs() if j["kind"] == "lr_search" and j["task"] == "SST-2"
                      and j["method"] == "lora" and j["lr_factor"] == 1.0)
    assert bm._job_done(search_job, [search]) and not bm._job_done(grid_job, [search])
    assert bm._job_done(grid_job, [dict(search, kind="grid", lr_factor=3.0)])
