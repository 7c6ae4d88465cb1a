"""Data-parallel value training under `accelerate launch` (2 CPU processes, gloo, via torchrun): the same curve and
weights as one process, because the summed per-process gradients are the single-process gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, save_tiny_model
from mavis_align.cli import main
from mavis_align.collect.store import write_trees
from mavis_align.train.parallel import DataParallel
from test_train import build_cat_trees


def test_shard_covers_every_example_once():
    items = list(range(11))
    shards = [DataParallel(rank=r, world=3).shard(items) for r in range(3)]
    assert sorted(x for sh in shards for x in sh) == items and shards[0] == [0, 3, 6, 9]
    single = DataParallel()
    assert single.shard(items) == items and single.sum(2.5) == 2.5 and single.is_main


@pytest.mark.timeout(600)
def test_accelerate_launch_two_cpu_processes_matches_one_process(tmp_path):
    model_dir = tmp_path / "m"
    save_tiny_model(model_dir)
    trees = tmp_path / "t.h5"
    write_trees(trees, build_cat_trees(), ["cat"], {})
    args = ["train", "--trees", str(trees), "--objective", "cat", "--backbone", str(model_dir), "--base-model", str(model_dir),
            "--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "0",
            "--sibling-weight", "0.5", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "mavis_align.cli"]
    proc = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert one["steps"] == two["steps"] > 5
    assert json.loads((tmp_path / "two" / "run.json").read_text())["config"]["processes"] == 2
    loss = [[json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l] for d in ("one", "two")]
    assert len(loss[0]) == len(loss[1]) and max(abs(a - b) for a, b in zip(*loss)) < 1e-4
    for part in ("heads.safetensors",):
        a, b = (load_file(str(tmp_path / d / "final" / part)) for d in ("one", "two"))
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    a, b = (load_file(str(tmp_path / d / "final" / "backbone" / "model.safetensors")) for d in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
