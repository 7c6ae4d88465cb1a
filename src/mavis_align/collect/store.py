"""HDF5 store of rollout trees (h5py; no pickle anywhere).

Layout (schema ``mavis-align-trees``, version 2 = version 1 + ``digests``)::

    /  attrs: schema, schema_version, objectives (JSON list), config (JSON), seed, git (JSON),
              versions (JSON), created
    /prompts/text        vlen utf-8 [P]     the user prompt of tree p
    /prompts/index       int64 [P]          its index in the source prompt list
    /prompts/split       int8  [P]          0 = train, 1 = val
    /prompts/ids         int32 [sum]        model-input token ids of all prompts, concatenated
    /prompts/ids_offset  int64 [P], ids_length int32 [P]
    /prompts/node_offset int64 [P], node_count int32 [P]   tree p's rows in /nodes
    /nodes/parent        int32 [N]          tree-local parent (-1 for the root)
    /nodes/depth         int16 [N]
    /nodes/token_offset  int64 [N], token_length int32 [N]   this node's new tokens in /tokens
    /nodes/terminal      bool  [N]          ends in EOS
    /nodes/value         float32 [N, M]     reward at leaves, mean over children inside
    /nodes/lpr           float32 [N]        sum log(pi_gen/pi_ref) at leaves, mean inside
    /nodes/text          vlen utf-8 [N]     decoded full response at leaves ("" elsewhere)
    /tokens/ids          int32 [S]; /tokens/logp_gen, /tokens/logp_ref float32 [S]
    /tokens/kl           float32 [S]        optional: KL(pi_gen(.|s_t) || pi_ref(.|s_t)) of each token's step;
                                            written when every token has it (trees collected since it is recorded)

Token sequences live apart from the tree structure (paper App. C). Files are written whole to a
temporary sibling and renamed into place, so a reader never sees a half-written file. Integrity: the
root attribute ``digests`` holds the SHA-256 of every dataset's contents (dtype, shape, values) and of
the other attributes; :func:`read_trees` verifies them, so a changed bit is a one-line
:class:`TreeFileError`, never silently different data. (Files written before the digests existed are
version 1, without digests, are still read, unchecked.)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .tree import Node, Tree

SCHEMA = "mavis-align-trees"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before the digests
_COMPRESS = {"compression": "gzip", "compression_opts": 4}


class TreeFileError(ValueError):
    """A tree file is missing, corrupt, or of another schema."""


UNRECORDED = "unrecorded"  # LabelledTrees.weights of MAVIS trees collected with default weights


class LabelledTrees:
    """Trees with per-node values [N_t, M] and LPRs [N_t], and their train/val split.

    ``weights``: the objective weights λ of the MAVIS policy that generated the trees ({name: λ}),
    None for untilted pi_ref trees, :data:`UNRECORDED` for MAVIS trees whose weights the file does
    not record (see :func:`collecting_weights`); a preference-conditioned value model trains on
    them at that λ.
    """

    def __init__(self, trees: list[Tree], values: list[np.ndarray], lprs: list[np.ndarray], splits: list[int], texts: list[list[str]] | None = None,
                 weights: dict[str, float] | str | None = None):
        if not (len(trees) == len(values) == len(lprs) == len(splits)):
            raise ValueError("trees, values, lprs and splits must have equal lengths")
        self.trees, self.values, self.lprs, self.splits = trees, values, lprs, splits
        self.texts = texts if texts is not None else [[""] * len(t.nodes) for t in trees]
        self.weights = weights

    def __len__(self) -> int:
        return len(self.trees)

    @staticmethod
    def concat(parts: Sequence["LabelledTrees"]) -> "LabelledTrees":
        out = LabelledTrees([], [], [], [], [])
        for p in parts:
            out.trees += p.trees
            out.values += p.values
            out.lprs += p.lprs
            out.splits += p.splits
            out.texts += p.texts
        kinds = {json.dumps(p.weights, sort_keys=True) for p in parts}
        out.weights = parts[0].weights if len(kinds) == 1 and parts else (UNRECORDED if parts else None)
        return out


def _digest(arr) -> str:
    """SHA-256 of an array's dtype kind, shape and values (strings as length-prefixed UTF-8)."""
    a = np.asarray(arr)
    h = hashlib.sha256()
    if a.dtype == object or a.dtype.kind in "SU":
        h.update(f"str{a.shape}".encode())
        for x in a.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little") + b)
    else:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _attrs_digest(attrs: dict) -> str:
    items = sorted((k, v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v) for k, v in attrs.items() if k != "digests")
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()


def _str_dtype():
    import h5py

    return h5py.string_dtype(encoding="utf-8")


def write_trees(target, data: LabelledTrees, objectives: Sequence[str], attrs: dict) -> None:
    """Write ``data`` into ``target`` (a path -> atomic replace, or an open binary file object)."""
    if isinstance(target, (str, Path)):
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        try:
            _write(tmp, data, objectives, attrs)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        _write(target, data, objectives, attrs)


def _write(dest, data: LabelledTrees, objectives: Sequence[str], attrs: dict) -> None:
    import h5py

    m = len(objectives)
    parent, depth, tok_off, tok_len, terminal, lpr, texts = [], [], [], [], [], [], []
    values = []
    tokens, lg, lr, kl = [], [], [], []
    p_ids, p_off, p_len, n_off, n_cnt = [], [], [], [], []
    n_total, s_total, pid_total = 0, 0, 0
    for tree, v, l, tx in zip(data.trees, data.values, data.lprs, data.texts):
        v = np.asarray(v, dtype=np.float32).reshape(len(tree.nodes), m)
        p_off.append(pid_total)
        p_len.append(len(tree.prompt_ids))
        p_ids.extend(tree.prompt_ids)
        pid_total += len(tree.prompt_ids)
        n_off.append(n_total)
        n_cnt.append(len(tree.nodes))
        for node in tree.nodes:
            parent.append(node.parent)
            depth.append(node.depth)
            tok_off.append(s_total)
            tok_len.append(len(node.tokens))
            terminal.append(node.terminal)
            tokens.extend(node.tokens)
            lg.extend(node.logp_gen)
            lr.extend(node.logp_ref)
            kl.extend(node.kl)
            s_total += len(node.tokens)
        values.append(v)
        lpr.extend(np.asarray(l, dtype=np.float32).tolist())
        texts.extend(tx)
        n_total += len(tree.nodes)
    with h5py.File(dest, "w") as f:
        f.attrs["schema"] = SCHEMA
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["objectives"] = json.dumps(list(objectives))
        for key, val in attrs.items():
            f.attrs[key] = val if isinstance(val, (int, float, str)) else json.dumps(val, default=str)
        g = f.create_group("prompts")
        g.create_dataset("text", data=np.array([t.prompt for t in data.trees], dtype=object), dtype=_str_dtype())
        g.create_dataset("index", data=np.array([t.prompt_index for t in data.trees], dtype=np.int64))
        g.create_dataset("split", data=np.array(data.splits, dtype=np.int8))
        g.create_dataset("ids", data=np.array(p_ids, dtype=np.int32), **_COMPRESS)
        g.create_dataset("ids_offset", data=np.array(p_off, dtype=np.int64))
        g.create_dataset("ids_length", data=np.array(p_len, dtype=np.int32))
        g.create_dataset("node_offset", data=np.array(n_off, dtype=np.int64))
        g.create_dataset("node_count", data=np.array(n_cnt, dtype=np.int32))
        g = f.create_group("nodes")
        g.create_dataset("parent", data=np.array(parent, dtype=np.int32), **_COMPRESS)
        g.create_dataset("depth", data=np.array(depth, dtype=np.int16), **_COMPRESS)
        g.create_dataset("token_offset", data=np.array(tok_off, dtype=np.int64), **_COMPRESS)
        g.create_dataset("token_length", data=np.array(tok_len, dtype=np.int32), **_COMPRESS)
        g.create_dataset("terminal", data=np.array(terminal, dtype=bool), **_COMPRESS)
        g.create_dataset("value", data=np.concatenate(values) if values else np.zeros((0, m), np.float32), **_COMPRESS)
        g.create_dataset("lpr", data=np.array(lpr, dtype=np.float32), **_COMPRESS)
        g.create_dataset("text", data=np.array(texts, dtype=object), dtype=_str_dtype(), **_COMPRESS)
        g = f.create_group("tokens")
        g.create_dataset("ids", data=np.array(tokens, dtype=np.int32), **_COMPRESS)
        g.create_dataset("logp_gen", data=np.array(lg, dtype=np.float32), **_COMPRESS)
        g.create_dataset("logp_ref", data=np.array(lr, dtype=np.float32), **_COMPRESS)
        if s_total and all(len(node.kl) == len(node.tokens) for tree in data.trees for node in tree.nodes):
            g.create_dataset("kl", data=np.array(kl, dtype=np.float32), **_COMPRESS)
        digests = {k: _digest(f[k][()]) for k in _REQUIRED + _OPTIONAL if k in f}
        digests["attrs"] = _attrs_digest(dict(f.attrs))
        f.attrs["digests"] = json.dumps(digests, sort_keys=True)


_REQUIRED = [
    "prompts/text", "prompts/index", "prompts/split", "prompts/ids", "prompts/ids_offset", "prompts/ids_length",
    "prompts/node_offset", "prompts/node_count", "nodes/parent", "nodes/depth", "nodes/token_offset",
    "nodes/token_length", "nodes/terminal", "nodes/value", "nodes/lpr", "nodes/text", "tokens/ids",
    "tokens/logp_gen", "tokens/logp_ref",
]
_OPTIONAL = ["tokens/kl"]


def read_trees(source) -> tuple[LabelledTrees, list[str], dict]:
    """Read a whole tree file -> (data, objectives, attrs). Clear errors for anything wrong."""
    import h5py

    name = str(source) if isinstance(source, (str, Path)) else "<in-memory tree file>"
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise TreeFileError(f"tree file {name!r} does not exist")
    try:
        f = h5py.File(source, "r")
    except Exception as err:  # h5py raises OSError, but corrupt metadata can surface as others
        raise TreeFileError(f"{name} is not a readable HDF5 file (corrupt or truncated?): {err}") from None
    try:
        with f:
            return _read_open(f, name)
    except TreeFileError:
        raise
    except Exception as err:  # a flipped bit in structure or data: one clear line, never a traceback
        raise TreeFileError(f"{name} is corrupt ({type(err).__name__}: {str(err)[:200]}); collect it again or restore it") from None


def _read_open(f, name: str) -> tuple[LabelledTrees, list[str], dict]:
    if f.attrs.get("schema") != SCHEMA:
        raise TreeFileError(f"{name} is not a mavis-align tree file (schema {f.attrs.get('schema')!r}, expected {SCHEMA!r})")
    version = int(f.attrs.get("schema_version", -1))
    if version not in READABLE_VERSIONS:
        raise TreeFileError(f"{name} has tree schema version {version}; this mavis-align reads versions {list(READABLE_VERSIONS)}")
    if version >= 2 and "digests" not in f.attrs:
        raise TreeFileError(f"{name} is corrupt: its checksums are missing; collect it again or restore it")
    missing = [k for k in _REQUIRED if k not in f]
    if missing:
        raise TreeFileError(f"{name} lacks datasets {missing}")
    try:
        objectives = json.loads(f.attrs["objectives"])
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items() if k not in ("schema", "schema_version", "objectives", "digests")}
        a = {k: f[k][()] for k in _REQUIRED + _OPTIONAL if k in f}
    except (OSError, KeyError, ValueError) as err:
        raise TreeFileError(f"{name} could not be read (corrupt?): {err}") from err
    if "digests" in f.attrs:
        want = json.loads(f.attrs["digests"])
        if want.get("attrs") != _attrs_digest(dict(f.attrs)):
            raise TreeFileError(f"{name} is corrupt: its attributes fail their checksum; collect it again or restore it")
        for k in _REQUIRED + [k for k in _OPTIONAL if k in a or k in want]:
            if k not in a:
                raise TreeFileError(f"{name} is corrupt: dataset {k!r} is missing; collect it again or restore it")
            if want.get(k) != _digest(a[k]):
                raise TreeFileError(f"{name} is corrupt: dataset {k!r} fails its checksum; collect it again or restore it")
    trees, values, lprs, texts = [], [], [], []
    text_p = [t.decode() if isinstance(t, bytes) else t for t in a["prompts/text"]]
    text_n = [t.decode() if isinstance(t, bytes) else t for t in a["nodes/text"]]
    for p in range(len(text_p)):
        off, cnt = int(a["prompts/node_offset"][p]), int(a["prompts/node_count"][p])
        io, il = int(a["prompts/ids_offset"][p]), int(a["prompts/ids_length"][p])
        nodes = []
        for i in range(off, off + cnt):
            so, sl = int(a["nodes/token_offset"][i]), int(a["nodes/token_length"][i])
            nodes.append(Node(
                int(a["nodes/parent"][i]), int(a["nodes/depth"][i]), a["tokens/ids"][so:so + sl].tolist(),
                a["tokens/logp_gen"][so:so + sl].tolist(), a["tokens/logp_ref"][so:so + sl].tolist(), bool(a["nodes/terminal"][i]),
                kl=a["tokens/kl"][so:so + sl].tolist() if "tokens/kl" in a else [],
            ))
        for i, node in enumerate(nodes):
            if node.parent >= 0:
                if node.parent >= cnt:
                    raise TreeFileError(f"{name}: tree {p} node {i} has parent {node.parent} outside the tree")
                nodes[node.parent].children.append(i)
        trees.append(Tree(int(a["prompts/index"][p]), text_p[p], a["prompts/ids"][io:io + il].tolist(), nodes))
        values.append(a["nodes/value"][off:off + cnt].astype(np.float64))
        lprs.append(a["nodes/lpr"][off:off + cnt].astype(np.float64))
        texts.append(text_n[off:off + cnt])
    out = LabelledTrees(trees, values, lprs, a["prompts/split"].astype(int).tolist(), texts)
    try:
        out.weights = collecting_weights(attrs)
    except ValueError:
        out.weights = UNRECORDED  # an error only for a preference-conditioned model (train.regression)
    return out, objectives, attrs


def collecting_weights(attrs: dict) -> dict[str, float] | None:
    """The objective weights of the policy that collected a tree file (from its attributes):
    None for pi_ref trees (no value models); raises when MAVIS collected them with unrecorded
    (default) weights, since then the λ its trees belong to is unknown."""
    config = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
    if not config.get("values"):
        return None
    weights = config.get("weights")
    if not weights:
        raise ValueError("these trees were collected by MAVIS with default weights, which the file does not record; "
                         "collect with explicit --weights to train a preference-conditioned value model on them")
    return {str(k): float(v) for k, v in weights.items()}


def _decode_attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v.item() if hasattr(v, "item") else v
