"""Atomic, re-shardable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of a checkpoint root::

    root/
      step_00000100/     a complete DCP checkpoint (every rank's shards + .metadata)
        meta.json        tables, step, anything the caller adds
      LATEST             name of the newest complete step directory

A save writes ``step_N.tmp/`` and renames it to ``step_N/`` once every rank
has finished, then replaces ``LATEST`` atomically (write + ``os.replace``). A
crash mid-save leaves a ``.tmp`` directory that nothing points to, and the
previous checkpoint stays loadable. Loading goes through DCP, so a checkpoint
saved by N ranks loads into M ranks (any sharding) or into the unsharded model.
"""

import json
import logging
import os
import shutil
from dataclasses import asdict, is_dataclass
from typing import Any, Dict, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from memcom_torchrec.modules.storage import table_storage


logger: logging.Logger = logging.getLogger(__name__)

LATEST = "LATEST"
META = "meta.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def table_signature(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Every embedding table of a model: its config class, sizes, features and tensors' shapes by role
    (``table_storage``), for mismatch checks."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, module in model.named_modules():
        leaf = name.split(".")[-1]
        if leaf in ("_embedding_bag_collection", "_embedding_collection"):
            continue  # the inner tables of a MEmCom/QR collection, described by their parent
        name = ".".join(p for p in name.split(".") if p not in ("_dmp_wrapped_module", "module"))
        configs = getattr(module, "embedding_bag_configs", None)
        tables = configs() if callable(configs) else getattr(module, "_embedding_bag_configs", None)
        if not tables:
            continue
        for t in tables:
            storage = table_storage(t)
            sig = {
                "kind": type(t).__name__,
                "num_embeddings": t.num_embeddings,
                "embedding_dim": t.embedding_dim,
                "feature_names": list(t.feature_names),
                "tensors": {x.role: list(x.shape) for x in storage.tensors},
                **dict(storage.options),
            }
            out[f"{name}:{t.name}" if name else t.name] = sig
    return out


def _legacy_fields(signature: Dict[str, Any]) -> Dict[str, Any]:
    """The size fields an older signature recorded, from a current signature's shapes by role."""
    tensors = signature.get("tensors", {})
    out: Dict[str, Any] = {}
    if signature["kind"] == "MEmComEmbeddingBagConfig":
        out.update(num_buckets=tensors["U"][0], train_entity_weights="w" in tensors)
    elif signature["kind"] == "QREmbeddingBagConfig":
        out.update(num_collisions=tensors["R"][0], entity_weights="w" in tensors)
    return out


def save_checkpoint(
    root: str,
    step: int,
    model: nn.Module,
    optimizers: Optional[Dict[str, Any]] = None,
    meta: Optional[Dict[str, Any]] = None,
    keep: int = 2,
) -> str:
    """Saves model (and optimizer) state from every rank; a collective.

    Args:
        root (str): checkpoint root directory.
        step (int): training step (names the directory).
        model (nn.Module): sharded or unsharded model.
        optimizers (Optional[Dict[str, Any]]): name -> optimizer with
            ``state_dict``/``load_state_dict`` (e.g. ``model.fused_optimizer``).
        meta (Optional[Dict[str, Any]]): JSON-serialisable extras (configs, RNG seeds...).
        keep (int): number of complete checkpoints to keep.

    Returns:
        str: the path of the new checkpoint.
    """
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    state: Dict[str, Any] = {"model": model.state_dict()}
    for key, opt in (optimizers or {}).items():
        state[f"optim.{key}"] = opt.state_dict()
    dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if _rank() == 0:
        info = {"step": step, "tables": table_signature(model), **(meta or {})}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(info, f, indent=2, default=_json_default)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, name)
        _prune(root, keep)
    _barrier()
    logger.info("saved checkpoint %s", final)
    return final


def _json_default(obj: Any) -> Any:
    if is_dataclass(obj):
        return asdict(obj)
    return str(obj)


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))


def _prune(root: str, keep: int) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    for d in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(root: str) -> Optional[str]:
    """Path of the newest complete checkpoint under ``root``, or None."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    full = os.path.join(root, name)
    if not os.path.exists(os.path.join(full, ".metadata")):
        raise ValueError(f"checkpoint {full} named by {path} is incomplete or missing (.metadata absent)")
    return full


def read_meta(path: str) -> Dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory."""
    meta = os.path.join(path, META)
    if not os.path.exists(meta):
        raise ValueError(f"{path} is not a memcom_torchrec checkpoint (no {META})")
    with open(meta) as f:
        return json.load(f)


def check_compatible(path: str, model: nn.Module) -> Dict[str, Any]:
    """Raises ``ValueError`` naming the table if the checkpoint's tables differ from the model's."""
    meta = read_meta(path)
    saved, current = meta.get("tables", {}), table_signature(model)
    for table in sorted(set(saved) | set(current)):
        if table not in saved:
            raise ValueError(f"checkpoint {path} has no table '{table}' (it has {sorted(saved)})")
        if table not in current:
            raise ValueError(f"checkpoint {path} has table '{table}', which the model lacks")
        if "tensors" in saved[table]:
            keys = set(saved[table]) | set(current[table])
            mine = current[table]
        else:  # a checkpoint from before the signature recorded shapes: its size fields, read from the shapes
            mine = dict(current[table], **_legacy_fields(current[table]))
            keys = set(mine) & set(saved[table])
        diff = {k: (saved[table].get(k), mine.get(k)) for k in sorted(keys) if saved[table].get(k) != mine.get(k)}
        if diff and "tensors" not in saved[table] and "num_buckets" in diff:
            raise ValueError(
                f"table '{table}' differs between checkpoint {path} and model: (saved, model) {diff}; checkpoints of "
                "MEmCom-family variants saved before the storage description (commit 10f3d22) were sized with w's "
                "grid padding in the ratio: load them with the version that trained them")
        if diff:
            raise ValueError(f"table '{table}' differs between checkpoint {path} and model: (saved, model) {diff}")
    return meta


def load_checkpoint(
    path: str,
    model: nn.Module,
    optimizers: Optional[Dict[str, Any]] = None,
    local: bool = False,
) -> Dict[str, Any]:
    """Loads a checkpoint into a sharded (any world size) or unsharded model.

    Args:
        path (str): a checkpoint directory (or a root with ``LATEST``).
        model (nn.Module): the model to load into.
        optimizers (Optional[Dict[str, Any]]): optimizers saved under the same names.
        local (bool): load into an unsharded model in this process only, without
            collectives (even when a process group exists; other ranks need not call it).

    Returns:
        Dict[str, Any]: the checkpoint's ``meta.json``.

    Raises:
        ValueError: missing/incomplete checkpoint or mismatched tables.
    """
    if os.path.exists(os.path.join(path, LATEST)):
        latest = latest_checkpoint(path)
        assert latest is not None
        path = latest
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise ValueError(f"no complete checkpoint at {path} (.metadata missing)")
    meta = check_compatible(path, model)
    state: Dict[str, Any] = {"model": model.state_dict()}
    for key, opt in (optimizers or {}).items():
        state[f"optim.{key}"] = opt.state_dict()
    dcp.load(state, checkpoint_id=path, no_dist=local or not dist.is_initialized())
    model.load_state_dict(state["model"])
    for key, opt in (optimizers or {}).items():
        opt.load_state_dict(state[f"optim.{key}"])
    return meta
