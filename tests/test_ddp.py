"""AFLoRA under torch's DistributedDataParallel: 2 processes, gloo backend, CPU, launched with torchrun.

Every rank takes the same freeze decisions (the scores come from the all-reduced gradients), equal to a
single-process run on the same global batch, with either supported strategy (rewrap_ddp after each
freeze event, or find_unused_parameters=True); keeping the original wrapper breaks as documented."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import aflora_min as am

WORKER = Path(__file__).with_name("_ddp_worker.py")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sys.path.insert(0, str(WORKER.parent))
    import _ddp_worker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        single = _ddp_worker.train(None)
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return single, ranks, _ddp_worker


@pytest.mark.parametrize("strategy", ["rewrap", "find_unused"])
def test_every_rank_freezes_like_the_single_process_run(runs, strategy):
    single, ranks, worker = runs
    r0, r1 = ranks[0][strategy], ranks[1][strategy]
    assert r0["error"] is None and r1["error"] is None
    assert r0["desync_steps"] == r1["desync_steps"] == []  # gradients bit-identical on both ranks, every step
    assert r0["frozen_at"] == r1["frozen_at"] == single["frozen_at"]
    assert len(single["frozen_at"]) == 6 and len(set(single["frozen_at"].values())) > 1  # frozen mid-run, in steps
    for k, v in r0["adapter"].items():
        assert torch.equal(v, r1["adapter"][k]), k
        torch.testing.assert_close(v, single["adapter"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_keeping_the_original_wrapper_breaks_as_documented(runs):
    """find_unused_parameters=False, no rewrap: the step after a freeze silently skips the all-reduce of
    that gradient bucket (ranks diverge), and the step after that raises."""
    single, ranks, _ = runs
    first = min(single["frozen_at"].values())  # frozen by the freezer.step() of loop step first - 1
    for r in ranks:
        assert r["plain"]["desync_steps"] == [first]
        assert r["plain"]["error_step"] == first + 1
        assert "Expected to have finished reduction in the prior iteration" in r["plain"]["error"]


def test_rewrap_ddp_raises_on_every_rank_when_ranks_froze_differently(runs):
    _, ranks, _ = runs
    for r in ranks:
        assert "ranks disagree on which parameters require grad" in r["disagree"]["error"]


def test_rewrap_ddp_needs_a_ddp_model():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        am.rewrap_ddp(torch.nn.Linear(2, 2))


def test_loading_a_checkpoint_into_a_ddp_model_that_it_freezes_warns(tmp_path):
    """load_checkpoint freezes matrices behind the wrapper's back: it must say to re-wrap."""
    sys.path.insert(0, str(WORKER.parent))
    import _ddp_worker
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, opt, freezer = _ddp_worker.build()
        for name in list(freezer.params)[:2]:
            freezer.freeze(name)                           # as a mid-run checkpoint would hold
        am.save_checkpoint(tmp_path / "c.pt", model, opt, freezer=freezer, step=3)
        model, opt, freezer = _ddp_worker.build()
        with pytest.warns(UserWarning, match="re-wrap it now"):
            am.load_checkpoint(tmp_path / "c.pt", DDP(model), opt, freezer=freezer)
        model, opt, freezer = _ddp_worker.build()          # into the inner model before wrapping: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            am.load_checkpoint(tmp_path / "c.pt", model, opt, freezer=freezer)
        assert sum(not p.requires_grad for p in freezer.params.values()) == 2
    finally:
        dist.destroy_process_group()
