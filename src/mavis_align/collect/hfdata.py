"""Rollout trees as a Hugging Face ``datasets.Dataset`` (Arrow / Parquet), and back.

One row per tree::

    prompt_index  int64           the prompt's position in the collection
    prompt        string          the user prompt
    prompt_ids    list<int32>     model-input token ids of the prompt
    split         string          "train" or "val"
    nodes         list<struct>    node 0 is the root; per node: parent (int32, -1 for the root),
                                  depth, terminal, tokens (list<int32>), logp_gen / logp_ref
                                  (list<float32>), value (list<float32>, one per objective),
                                  lpr (float32), text (the response text up to the node's end),
                                  kl (list<float32>: per-token KL(pi_gen || pi_ref) of the step;
                                  empty for trees collected before it was recorded)
    objectives    list<string>    the value columns' objectives (the same in every row)
    attrs         string          the tree file's attributes as JSON (collection spec, versions...)

The HDF5 store stays the working format (checksummed, resumable, fast to slice); a data set is the
form to share, inspect (``ds.to_pandas()``), save as Parquet or push to a hub. Values are float32
in both, so HDF5 -> data set -> HDF5 gives back the same arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .store import LabelledTrees, read_trees, write_trees
from .tree import Node, Tree

SPLITS = {0: "train", 1: "val"}


def features():
    """The data set's schema (``datasets.Features``)."""
    from datasets import Features, List, Value

    node = {
        "parent": Value("int32"), "depth": Value("int32"), "terminal": Value("bool"), "tokens": List(Value("int32")),
        "logp_gen": List(Value("float32")), "logp_ref": List(Value("float32")), "value": List(Value("float32")),
        "lpr": Value("float32"), "text": Value("string"), "kl": List(Value("float32")),
    }
    return Features({
        "prompt_index": Value("int64"), "prompt": Value("string"), "prompt_ids": List(Value("int32")), "split": Value("string"),
        "nodes": List(node), "objectives": List(Value("string")), "attrs": Value("string"),
    })


def trees_to_dataset(source):
    """A tree file (path) or ``(LabelledTrees, objectives, attrs)`` -> a ``datasets.Dataset`` (one row per tree)."""
    from datasets import Dataset

    data, objectives, attrs = read_trees(source) if isinstance(source, (str, Path)) else source
    attrs_json = json.dumps(attrs, sort_keys=True, default=str)

    def rows():
        for tree, values, lprs, split, texts in zip(data.trees, data.values, data.lprs, data.splits, data.texts):
            v = np.asarray(values, dtype=np.float32).reshape(len(tree.nodes), len(objectives))
            yield {
                "prompt_index": tree.prompt_index, "prompt": tree.prompt, "prompt_ids": list(tree.prompt_ids), "split": SPLITS[int(split)],
                "nodes": [{"parent": n.parent, "depth": n.depth, "terminal": bool(n.terminal), "tokens": list(n.tokens),
                           "logp_gen": list(n.logp_gen), "logp_ref": list(n.logp_ref), "value": v[i].tolist(),
                           "lpr": float(lprs[i]), "text": texts[i], "kl": list(n.kl)} for i, n in enumerate(tree.nodes)],
                "objectives": list(objectives), "attrs": attrs_json,
            }

    return Dataset.from_list(list(rows()), features=features())  # in memory: no cache keyed on a hash of the data


def dataset_to_trees(ds) -> tuple[LabelledTrees, list[str], dict]:
    """A data set made by :func:`trees_to_dataset` (or loaded from its Parquet / a hub) -> the
    ``(LabelledTrees, objectives, attrs)`` that :func:`~mavis_align.collect.store.read_trees` gives."""
    missing = [c for c in features() if c not in ds.column_names]
    if missing:
        raise ValueError(f"not a mavis-align tree data set: columns {missing} are missing")
    objectives = list(ds[0]["objectives"]) if len(ds) else []
    attrs = json.loads(ds[0]["attrs"]) if len(ds) else {}
    back = {name: key for key, name in SPLITS.items()}
    trees, values, lprs, splits, texts = [], [], [], [], []
    for row in ds:
        if list(row["objectives"]) != objectives:
            raise ValueError(f"tree {row['prompt_index']}: objectives {row['objectives']} differ from {objectives}")
        tree = Tree(int(row["prompt_index"]), row["prompt"], list(row["prompt_ids"]), [])
        for n in row["nodes"]:
            tree.nodes.append(Node(int(n["parent"]), int(n["depth"]), list(n["tokens"]), list(n["logp_gen"]), list(n["logp_ref"]), bool(n["terminal"]),
                                   kl=list(n.get("kl") or [])))  # data sets made before per-step KLs lack the field
        for i, node in enumerate(tree.nodes):
            if node.parent >= 0:
                tree.nodes[node.parent].children.append(i)
        trees.append(tree)
        # stored as float32 (as in HDF5), held as float64 like read_trees gives them
        values.append(np.asarray([n["value"] for n in row["nodes"]], dtype=np.float32).reshape(len(tree.nodes), len(objectives)).astype(np.float64))
        lprs.append(np.asarray([n["lpr"] for n in row["nodes"]], dtype=np.float32).astype(np.float64))
        splits.append(back[row["split"]])
        texts.append([n["text"] for n in row["nodes"]])
    return LabelledTrees(trees, values, lprs, splits, texts), objectives, attrs


def export_trees(tree_file: str | Path, out: str | Path) -> Path:
    """Write a tree file as a data set: ``out`` ending in ``.parquet`` -> one Parquet file, else a
    ``save_to_disk`` folder."""
    ds = trees_to_dataset(tree_file)
    out = Path(out)
    if out.suffix == ".parquet":
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out))
    else:
        ds.save_to_disk(str(out))
    return out


def import_trees(source: str | Path, out: str | Path) -> Path:
    """A data set (a ``.parquet`` file, a ``save_to_disk`` folder or a hub id) -> a checksummed tree file."""
    import datasets

    src = Path(source)
    if src.suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(str(src))  # its own schema: older files lack node "kl"
    elif src.is_dir():
        ds = datasets.load_from_disk(str(src))
    else:
        ds = datasets.load_dataset(str(source), split="train")
    data, objectives, attrs = dataset_to_trees(ds)
    write_trees(out, data, objectives, attrs)
    return Path(out)
