"""Plain-PyTorch references of MEmCom pooling and of FBGEMM's fused optimizers."""

from typing import Dict, List, Optional

import torch


def reference_pool(
    U: torch.Tensor,
    w: Optional[torch.Tensor],
    ids: torch.Tensor,
    lengths: torch.Tensor,
    mean: bool = False,
    input_weights: Optional[torch.Tensor] = None,
    hashed: bool = True,
) -> torch.Tensor:
    """``out[b] = sum_j c_j * w[i_j] * U[i_j mod m]`` per bag, one bag at a time."""
    m = U.shape[0]
    rows = []
    start = 0
    for length in lengths.tolist():
        acc = torch.zeros(U.shape[1], dtype=U.dtype)
        for j in range(start, start + length):
            i = int(ids[j])
            term = U[i % m] if hashed else U[i]
            if w is not None:
                term = w[i] * term
            if input_weights is not None:
                term = input_weights[j] * term
            acc = acc + term
        if mean and length > 0:
            acc = acc / length
        rows.append(acc)
        start += length
    return torch.stack(rows) if rows else torch.zeros(0, U.shape[1])


def sgd_(p: torch.Tensor, g: torch.Tensor, lr: float) -> None:
    p.sub_(lr * g)


def adagrad_(p: torch.Tensor, g: torch.Tensor, state: torch.Tensor, lr: float, eps: float) -> None:
    state.add_(g * g)
    p.sub_(lr * g / (state.sqrt() + eps))


def rowwise_adagrad_(p: torch.Tensor, g: torch.Tensor, state: torch.Tensor, lr: float, eps: float) -> None:
    """``state`` has one entry per row: the running sum of ``mean(g_row**2)``."""
    state.add_((g * g).mean(dim=1))
    p.sub_(lr * g / (state.sqrt() + eps).unsqueeze(1))


class ReferenceOptimizer:
    """Applies one of the reference updates to named tensors (2-D: row-wise state for U)."""

    def __init__(self, kind: str, lr: float, eps: float = 1e-8) -> None:
        self.kind, self.lr, self.eps = kind, lr, eps
        self.state: Dict[str, torch.Tensor] = {}

    def step(self, name: str, p: torch.Tensor, g: torch.Tensor, rowwise_ok: bool = True) -> None:
        with torch.no_grad():
            if self.kind == "sgd":
                sgd_(p, g, self.lr)
            elif self.kind == "adagrad" or (self.kind == "rowwise_adagrad" and (p.dim() == 1 or not rowwise_ok)):
                s = self.state.setdefault(name, torch.zeros_like(p))
                adagrad_(p, g, s, self.lr, self.eps)
            elif self.kind == "rowwise_adagrad":
                s = self.state.setdefault(name, torch.zeros(p.shape[0]))
                rowwise_adagrad_(p, g, s, self.lr, self.eps)
            else:
                raise ValueError(self.kind)


def make_kjt_inputs(
    keys: List[str], num_embeddings: Dict[str, int], batch: int, max_len: int, generator: torch.Generator
):
    """Random ids and lengths (empty bags included) for each key, KJT order (key-major)."""
    lengths, values = [], []
    for k in keys:
        ln = torch.randint(0, max_len + 1, (batch,), generator=generator)
        lengths.append(ln)
        values.append(torch.randint(0, num_embeddings[k], (int(ln.sum()),), generator=generator))
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.long), torch.cat(lengths)
