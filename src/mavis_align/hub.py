"""Sharing value models: a model card generated from what the folder and its training run record,
``push_to_hub``, and loading by hub id through the same code path as a local folder.

A value model folder (``.../value/best``) holds ``meta.json`` (backbone, base model, tokenizer
fingerprint, objectives, pool); its training folder (``.../value``) holds ``result.json`` (the
held-out quality) and ``run.json`` (the training settings: ζ, solver, data size, tree files); the
tree files' attributes hold the collection settings (the generating policy's β and value models,
hence the policy-iteration round). :func:`model_card` reads whatever of these exists.

Uploading goes through a client with huggingface_hub's ``HfApi`` methods ``create_repo`` and
``upload_folder``; tests pass a fake one, so no test touches the network.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def card_facts(folder: str | Path) -> dict[str, Any]:
    """Everything the card states, gathered from ``folder`` and its training run (missing parts: None)."""
    from .values import ValueModelError

    folder = Path(folder)
    meta = _json(folder / "meta.json")
    if meta is None:
        raise ValueModelError(f"{folder} is not a mavis-align value model: meta.json is missing or unreadable")
    train_dir = folder.parent if (folder.parent / "result.json").exists() else None
    result = _json(train_dir / "result.json") if train_dir else None
    run = _json(train_dir / "run.json") if train_dir else None
    cfg = (run or {}).get("config", {})
    train_cfg = cfg.get("train", {})
    collection = None
    for tree_file in cfg.get("trees", []) or []:
        try:
            from .collect import read_trees

            _, _, attrs = read_trees(tree_file)
            collection = attrs.get("config") or attrs.get("spec")  # the collection spec, as collect records it
            break
        except Exception:  # a moved or missing tree file: the card says less, it does not fail
            continue
    iteration = None
    match = re.search(r"iter(\d+)", str(folder.resolve()))
    if match:
        iteration = int(match.group(1))
    elif collection is not None:
        iteration = 0 if not collection.get("values") else None
    from .rewards import REWARDS

    objectives = meta.get("objectives", [])
    return {
        "objectives": objectives,
        "rewards": {o: (REWARDS[o].description if o in REWARDS else o) for o in objectives},
        "base_model": meta.get("base_model"),
        "backbone": meta.get("backbone"),
        "pool": meta.get("pool"),
        "frozen_backbone": bool(meta.get("frozen_backbone")),
        "tokenizer_fingerprint": meta.get("tokenizer_fingerprint"),
        "iteration": iteration,
        "beta": (collection or {}).get("tree", {}).get("beta") if collection and collection.get("values") else None,
        "collection_values": (collection or {}).get("values"),
        "zeta": train_cfg.get("zeta"),
        "kl_estimator": train_cfg.get("kl_estimator", "sampled") if train_cfg.get("zeta") else None,
        "solver": train_cfg.get("solver"),
        "train_examples": cfg.get("train_examples"),
        "val_examples": cfg.get("val_examples"),
        "prompts": (collection or {}).get("limit"),
        "dataset": (collection or {}).get("dataset"),
        "quality": ((result or {}).get("quality") or {}).get("per_objective"),
        "placement": (run or {}).get("placement"),
        "git": (run or {}).get("git"),
    }


def model_card(folder: str | Path, *, repo_id: str | None = None) -> str:
    """The README.md of a value model folder (markdown with a YAML header the hub reads)."""
    f = card_facts(folder)
    name = repo_id or Path(folder).resolve().parent.parent.name + "-value"
    objs = ", ".join(f["objectives"])
    lines = [
        "---",
        "library_name: mavis-align",
        "tags: [mavis, value-model, multi-objective-alignment, inference-time-alignment]",
        f"base_model: {f['base_model']}" if f["base_model"] and "/" in str(f["base_model"]) else "base_model_relation: adapter",
        "---",
        "",
        f"# {name}",
        "",
        f"A MAVIS value model (mavis-align) for the objective{'s' if len(f['objectives']) > 1 else ''} **{objs}**: V(s) estimates the",
        "soft (KL-regularised) value of a partial response s under the base model; at decoding time the",
        "top-k next tokens of the base model are tilted by exp(β · NORMALIZE(Σ λ_m V_m(s ⊕ a))).",
        "",
        "| | |",
        "|---|---|",
        f"| base model (π_ref) | `{f['base_model']}` |",
        f"| tokenizer fingerprint | `{f['tokenizer_fingerprint']}` (the value model reads the base model's token ids) |",
        f"| backbone | `{f['backbone']}`{' (frozen trunk, heads trained)' if f['frozen_backbone'] else ''}, heads read the `{f['pool']}` state |",
    ]
    for o, desc in f["rewards"].items():
        lines.append(f"| reward behind `{o}` | {desc} |")
    if f["iteration"] is not None:
        lines.append(f"| policy-iteration round | {f['iteration']} (0: trained on trees of π_ref) |")
    if f["beta"] is not None:
        lines.append(f"| β of the policy that collected its trees | {f['beta']} |")
    if f["zeta"] is not None:
        kl = {"sampled": "the sampled tokens' log-ratios", "expected": "each step's KL to π_ref"}.get(f["kl_estimator"] or "", "")
        lines.append(f"| ζ (KL penalty of the targets, eq. 6) | {f['zeta']}{' on ' + kl if kl else ''} |")
    if f["solver"]:
        lines.append(f"| training | {f['solver']}; {f['train_examples']} train / {f['val_examples']} held-out nodes"
                     + (f" from {f['prompts']} prompts of `{f['dataset']}`" if f["prompts"] else "") + " |")
    if f["placement"]:
        lines.append(f"| trained on | {f['placement']}{' at git ' + str(f['git'])[:12] if f['git'] else ''} |")
    lines += ["", "## Quality on held-out trees", ""]
    if f["quality"]:
        lines += ["| objective | R² | sibling concordance | pairs |", "|---|---|---|---|"]
        for o, q in f["quality"].items():
            conc = q.get("concordance")
            se = q.get("concordance_se")
            lines.append(f"| {o} | {q.get('r2'):.3f} | {conc:.3f} ± {se:.3f} | {q.get('pairs')} |" if conc is not None and q.get("r2") is not None
                         else f"| {o} | {q.get('r2')} | {conc} | {q.get('pairs')} |")
        lines += ["", "R²: 1 − MSE / variance of the held-out Monte-Carlo targets. Sibling concordance: over pairs of",
                  "sibling nodes with different Monte-Carlo values, the fraction the model orders as their values do",
                  "(0.5 is chance); this is what the tilt uses. A model near R² 0 / concordance 0.5 has not learned."]
    else:
        lines.append("Not recorded (the training folder's result.json was not found next to this model).")
    hub = repo_id or "OWNER/NAME"
    lines += [
        "", "## Use", "",
        "```bash",
        "pip install mavis-align",
        f"mavis-align generate --model {f['base_model']} --value {f['objectives'][0]}={hub} --weights {f['objectives'][0]}=1 --beta 2 --prompt \"...\"",
        f"mavis-align serve --model {f['base_model']} --value {f['objectives'][0]}={hub}   # per-request objective_weights over HTTP",
        "```", "",
        "```python",
        "from mavis_align.decoding import MavisDecoder, SamplingConfig",
        f"dec = MavisDecoder.load({f['base_model']!r}, [{(f['objectives'][0] + '=' + hub)!r}])",
        f"dec.generate([\"...\"], weights={{{f['objectives'][0]!r}: 1.0}}, config=SamplingConfig(top_k=15, beta=2.0))",
        "```", "",
        "Files: `meta.json`, `heads.safetensors`, `backbone/` (safetensors), `tokenizer/`. No pickle.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, *, repo_id: str | None = None) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(folder, repo_id=repo_id))
    return path


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None, api=None,
                commit_message: str | None = None) -> str:
    """Upload a value model folder with a generated model card to ``repo_id``; returns the repo id.

    ``api``: an object with ``create_repo`` and ``upload_folder`` as ``huggingface_hub.HfApi`` has
    (default: ``HfApi(token=token)``). The folder itself is not modified: the card and the model
    files are staged in a temporary folder.
    """
    from .values import ValueModel

    if not HUB_ID.match(repo_id):
        raise ValueError(f"repo id {repo_id!r} must look like OWNER/NAME")
    folder = Path(folder)
    ValueModel.load(folder, device="cpu", dtype="float32")  # refuse to publish a folder that does not load
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mavis-push-") as tmp:
        stage = Path(tmp) / "model"
        shutil.copytree(folder, stage, ignore=shutil.ignore_patterns("README.md"))
        (stage / "README.md").write_text(model_card(folder, repo_id=repo_id))
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(stage), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message or f"mavis-align value model ({', '.join(json.loads((folder / 'meta.json').read_text())['objectives'])})")
    return repo_id


PACKAGED_PREFIX = "packaged:"


def _packaged_root() -> Path:
    from importlib import resources

    return Path(str(resources.files("mavis_align") / "pretrained"))


def packaged_value_models() -> list[str]:
    """Names of the value models shipped inside the package (``packaged:NAME``)."""
    root = _packaged_root()
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []


def resolve_value_source(name: str | Path) -> Path:
    """A value model's local folder: ``packaged:NAME`` (shipped in the package, see
    :func:`packaged_value_models`), ``name`` itself when it exists, else a hub id downloaded (or
    found in the HF cache) with ``huggingface_hub.snapshot_download``. Then one loading path."""
    if str(name).startswith(PACKAGED_PREFIX):
        from .values import ValueModelError

        key, shipped = str(name)[len(PACKAGED_PREFIX):], packaged_value_models()
        if key not in shipped:
            raise ValueModelError(f"no packaged value model {key!r}; shipped: {', '.join(shipped) or 'none'}")
        return _packaged_root() / key
    path = Path(name).expanduser()
    if path.exists() or not HUB_ID.match(str(name)):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(name), repo_type="model"))
    except Exception as err:
        from .values import ValueModelError

        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueModelError(f"value model {str(name)!r} is not a local folder, and as a hub id it could not be fetched: {type(err).__name__}: {first}") from None
