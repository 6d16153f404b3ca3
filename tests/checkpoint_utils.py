"""A trainer checkpoint (DCP) as flat tensors, and bitwise comparison of two."""

from typing import Dict


def checkpoint_tensors(path: str) -> Dict[str, object]:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.rstrip("/") + ".pt"
    dcp_to_torch_save(path, out)
    flat: Dict[str, object] = {}

    def walk(v: object, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{key}/{k}")
        else:
            flat[key] = v

    walk(torch.load(out, weights_only=False), "")
    return flat


def assert_same_checkpoint(a: str, b: str) -> None:
    import torch

    x, y = checkpoint_tensors(a), checkpoint_tensors(b)
    assert x.keys() == y.keys()
    assert any("optim.dense" in k for k in x) and any("optim.fused" in k for k in x)
    for k in x:
        if isinstance(x[k], torch.Tensor):
            assert torch.equal(x[k], y[k]), f"{k} differs by {(x[k].float() - y[k].float()).abs().max()}"
        else:
            assert x[k] == y[k], k
