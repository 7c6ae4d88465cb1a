"""Sharing and tracking (issue 18): model cards, push to a (fake, local) hub and load by hub id,
--report-to trackio read back offline, trees HDF5 -> datasets -> HDF5 unchanged, and the
hypervolume / Pareto filter from moocore checked against independent computations."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_model
from mavis_align.cli import main
from mavis_align.collect.store import read_trees, write_trees
from mavis_align.values import ValueModel, ValueModelError
from test_train import build_cat_trees, new_value_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A value model trained on tree files on disk (so its run record names them) -> (folder, trees)."""
    from mavis_align.train import TrainConfig, train_value_model

    d = tmp_path_factory.mktemp("trained")
    trees = d / "iter0" / "trees.h5"
    write_trees(trees, build_cat_trees(), ["cat"], {"config": {"model": "tiny", "values": [], "limit": 16, "dataset": "cats", "tree": {"beta": 1.0}}})
    vm = new_value_model()
    vm.meta.update({"backbone": "tiny-test", "base_model": "tiny-base"})
    train_value_model(vm, [trees], d / "iter0" / "cat" / "value", TrainConfig(lr=3e-3, epochs=2, batch_size=16, eval_every=0, zeta=0.03), progress=False)
    return d / "iter0" / "cat" / "value" / "best", trees


def test_model_card_states_what_a_user_needs(trained):
    from mavis_align.hub import model_card

    folder, _ = trained
    card = model_card(folder, repo_id="me/cat-value")
    res = json.loads((folder.parent / "result.json").read_text())
    q = res["quality"]["per_objective"]["cat"]
    meta = json.loads((folder / "meta.json").read_text())
    for needle in ["**cat**", "`tiny-base`", meta["tokenizer_fingerprint"], "`tiny-test`", "policy-iteration round | 0", "ζ (KL penalty", "0.03 on the sampled tokens' log-ratios",
                   f"{res['train_examples']} train / {res['val_examples']} held-out nodes", "from 16 prompts of `cats`", f"{q['r2']:.3f}",
                   f"{q['concordance']:.3f} ± {q['concordance_se']:.3f}", str(q["pairs"]), "--value cat=me/cat-value", "mavis-align serve", "No pickle"]:
        assert needle in card, needle
    assert card.startswith("---\nlibrary_name: mavis-align")


class FakeHub:
    """create_repo / upload_folder like huggingface_hub.HfApi, into a local folder per repo."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
        self.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)

    def snapshot_download(self, repo_id, repo_type="model", **kw):
        if not (self.root / repo_id).is_dir():
            raise FileNotFoundError(f"Repository Not Found for {repo_id}")
        return str(self.root / repo_id)


def test_push_and_load_by_hub_id_round_trip(trained, tmp_path, monkeypatch):
    import huggingface_hub

    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.hub import push_to_hub

    folder, _ = trained
    hub = FakeHub(tmp_path / "hub")
    assert push_to_hub(folder, "me/cat-value", private=True, api=hub) == "me/cat-value"
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] and hub.calls[0][2] is True
    assert not (folder / "README.md").exists()  # the model folder itself is left as it was
    assert "me/cat-value" in (tmp_path / "hub" / "me" / "cat-value" / "README.md").read_text()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    from_hub, local = ValueModel.load("me/cat-value"), ValueModel.load(folder)
    assert from_hub.objectives == ["cat"] and all(torch.equal(a, b) for a, b in zip(from_hub.state_dict().values(), local.state_dict().values()))
    base = save_tiny_model(tmp_path / "base")
    dec = MavisDecoder.load(str(base), ["cat=me/cat-value"])
    assert dec.objectives == ["cat"]
    with pytest.raises(ValueModelError, match="not a local folder, and as a hub id it could not be fetched: FileNotFoundError"):
        ValueModel.load("me/no-such-model")
    with pytest.raises(ValueError, match="OWNER/NAME"):
        push_to_hub(folder, "not a repo", api=hub)


def test_card_and_push_cli(trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    folder, _ = trained
    copy = tmp_path / "v"
    shutil.copytree(folder.parent, copy)
    assert main(["card", str(copy / "best"), "--repo-id", "me/x"]) == 0
    assert "--value cat=me/x" in (copy / "best" / "README.md").read_text()
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    assert main(["push", str(copy / "best"), "me/y"]) == 0
    assert (tmp_path / "hub" / "me" / "y" / "heads.safetensors").exists()


def test_report_to_trackio_writes_a_run_trackio_reads_back(tmp_path, monkeypatch):
    import os

    from trackio.sqlite_storage import SQLiteStorage

    model_dir = save_tiny_model(tmp_path / "m")
    trees = tmp_path / "t.h5"
    write_trees(trees, build_cat_trees(), ["cat"], {})
    out = tmp_path / "v"
    assert main(["train", "--trees", str(trees), "--objective", "cat", "--backbone", str(model_dir), "--base-model", str(model_dir),
                 "--epochs", "1", "--batch-size", "8", "--eval-every", "0", "--report-to", "trackio", "--project", "mavis-test",
                 "--run-name", "cat-run", "--out", str(out)]) == 0
    logged = SQLiteStorage.get_logs("mavis-test", "cat-run")
    local = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert losses and losses == {r["step"]: pytest.approx(r["loss"]) for r in local if "loss" in r}
    assert any("quality/cat/r2" in r for r in logged)
    db = Path(SQLiteStorage.get_project_db_path("mavis-test"))
    assert db.exists() and db.parent == Path(os.environ["TRACKIO_DIR"])  # local, offline (conftest's folder)


def _same_trees(a, b) -> None:
    (da, oa, aa), (db, ob, ab) = a, b
    assert oa == ob and aa == ab and da.splits == db.splits and da.texts == db.texts
    for x, y in zip(da.values, db.values):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    for x, y in zip(da.lprs, db.lprs):
        assert np.array_equal(x, y)
    for ta, tb in zip(da.trees, db.trees):
        assert (ta.prompt_index, ta.prompt, ta.prompt_ids) == (tb.prompt_index, tb.prompt, tb.prompt_ids)
        assert [vars(n) for n in ta.nodes] == [vars(n) for n in tb.nodes]


@pytest.mark.parametrize("form", ["parquet", "folder"])
def test_trees_round_trip_through_a_dataset_unchanged(tmp_path, form, capsys):
    from mavis_align.collect.hfdata import dataset_to_trees, trees_to_dataset

    src = tmp_path / "t.h5"
    write_trees(src, build_cat_trees(), ["cat"], {"spec": {"model": "tiny", "seed": 7}, "seed": 7})
    ds = trees_to_dataset(src)
    assert len(ds) == 16 and set(ds[0]) == {"prompt_index", "prompt", "prompt_ids", "split", "nodes", "objectives", "attrs"}
    assert ds[0]["nodes"][0]["parent"] == -1 and ds.filter(lambda r: r["split"] == "val").num_rows == 4
    _same_trees(read_trees(src), dataset_to_trees(ds))
    exported = tmp_path / ("t.parquet" if form == "parquet" else "t_ds")
    assert main(["export-trees", str(src), str(exported)]) == 0
    back = tmp_path / "back.h5"
    assert main(["import-trees", str(exported), str(back)]) == 0
    _same_trees(read_trees(src), read_trees(back))
    assert main(["import-trees", str(exported), str(back)]) == 2  # no silent overwrite
    with pytest.raises(ValueError, match="not a mavis-align tree data set"):
        dataset_to_trees(ds.remove_columns(["attrs"]))


def _hv_inclusion_exclusion(points, ref):
    total = 0.0
    for r in range(1, len(points) + 1):
        for subset in itertools.combinations(points, r):
            corner = np.min(np.array(subset), axis=0)
            total += (-1) ** (r + 1) * float(np.prod(np.clip(corner - ref, 0, None)))
    return total


@pytest.mark.parametrize("d", [2, 3, 4])
def test_hypervolume_and_front_match_independent_computations(d):
    from mavis_align.evaluate import hypervolume, pareto_front

    rng = np.random.default_rng(d)
    for _ in range(5):
        pts = rng.random((7, d))
        ref = np.full(d, 0.1)
        assert hypervolume(pts.tolist(), ref.tolist()) == pytest.approx(_hv_inclusion_exclusion(pts, ref), rel=1e-9, abs=1e-12)
        brute = [i for i, p in enumerate(pts) if not any(np.all(q >= p) and np.any(q > p) for j, q in enumerate(pts) if j != i)]
        assert pareto_front(pts.tolist()) == brute
    assert pareto_front([]) == [] and hypervolume([], [0.0] * d) == 0.0
