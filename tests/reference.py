"""Plain-PyTorch references of MEmCom pooling and of FBGEMM's fused optimizers."""

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memcom_torchrec.optim.entity_weight_optimizer import EntityWeightOptimizerConfig

# The per-entity weight optimizers by family (``RowReference``).
SGD = [EmbOptimType.EXACT_SGD, EmbOptimType.SGD]
ADAGRAD = [EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.ROWWISE_ADAGRAD]
ADAM = [EmbOptimType.ADAM, EmbOptimType.PARTIAL_ROWWISE_ADAM]


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


def reference_step(
    ref: nn.Module, opt: ReferenceOptimizer, data: List[Tuple[Any, torch.Tensor]], world_size: int
) -> Tuple[List[torch.Tensor], Dict[str, torch.Tensor]]:
    """One step of an unsharded collection on the global batch, as the sharded twin takes it.

    The loss is averaged over ranks, as TorchRec does. ``w`` (``_entity_weights.*``) gets
    element-wise Adagrad under row-wise Adagrad: FBGEMM's row-wise rule for scalar rows.

    Args:
        ref (nn.Module): the unsharded collection (updated in place).
        opt (ReferenceOptimizer): the update rule.
        data (List[Tuple[KeyedJaggedTensor, torch.Tensor]]): each rank's batch and output projection.
        world_size (int): ranks.

    Returns:
        Tuple[List[torch.Tensor], Dict[str, torch.Tensor]]: each rank's pooled output, and every
        parameter's gradient before the update.
    """
    outs = [ref(kjt) for kjt, _ in data]
    loss = sum((kt.values() * proj).sum() for kt, (_, proj) in zip(outs, data)) / world_size
    ref.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in ref.named_parameters() if p.grad is not None}
    for name, p in ref.named_parameters():
        if p.grad is not None:
            opt.step(name, p.data, p.grad, rowwise_ok=not name.startswith("_entity_weights"))
    return [kt.values().detach() for kt in outs], grads


def planted_labels(kjt: Any, table: torch.Tensor) -> torch.Tensor:
    """A label per sample that the model can fit: 0.3 x the sum of ``table[id % len(table)]`` over its bags."""
    labels, start = torch.zeros(kjt.stride()), 0
    for n, b in zip(kjt.lengths().tolist(), [b for _ in kjt.keys() for b in range(kjt.stride())]):
        labels[b] += table[kjt.values()[start:start + n] % table.numel()].sum() * 0.3
        start += n
    return labels


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


class HostReads(TorchDispatchMode):
    """Counts ops that read a tensor's value back to the host (``item``, ``int()``, ``bool()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: List[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.is_nonzero.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def in_key_order(kt: Any, keys: List[str]) -> torch.Tensor:
    """A KeyedTensor's values with its keys in ``keys``' order.

    A sharded EBC orders its output keys by the plan (table-wise: by rank), not
    as the unsharded module does; tests compare and project by key through this.
    """
    values = kt.to_dict()
    return torch.cat([values[k] for k in keys], dim=1)


def rank_batches(step: int, world_size: int, keys: List[str], sizes: Dict[str, int], width: int, batch: int = 4):
    """Every rank's ``(kjt, proj)`` of one step: random bags (up to 5 ids) and an output projection ``batch x width``."""
    from torchrec import KeyedJaggedTensor

    out = []
    for r in range(world_size):
        g = torch.Generator().manual_seed(1000 * step + r)
        values, lengths = make_kjt_inputs(keys, sizes, batch, 5, g)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
        out.append((kjt, torch.randn(batch, width, generator=g)))
    return out


class RowReference:
    """One optimizer over ``N`` scalar rows, one Python float at a time (float64)."""

    def __init__(self, w: torch.Tensor, cfg: EntityWeightOptimizerConfig) -> None:
        self.w = [float(x) for x in w]
        self.cfg = cfg
        self.acc = [0.0] * len(self.w)  # Adagrad's sum of squared gradients
        self.m1 = [0.0] * len(self.w)  # Adam's moments
        self.m2 = [0.0] * len(self.w)
        self.t = 0  # Adam's step, one per table

    def step(self, ids: List[int], grads: List[float], lr: float) -> None:
        """Sums the gradients of duplicate ids, then updates each touched row once."""
        c, wd = self.cfg, self.cfg.weight_decay
        summed: Dict[int, float] = {}
        for i, g in zip(ids, grads):
            summed[i] = summed.get(i, 0.0) + g
        self.t += 1
        for i, g in summed.items():
            w = self.w[i]
            if c.optimizer in SGD:
                self.w[i] = w - lr * (g + wd * w)
            elif c.optimizer in ADAGRAD:
                g = g + wd * w
                self.acc[i] += g * g
                self.w[i] = w - lr * g / (math.sqrt(self.acc[i]) + c.eps)
            else:  # FBGEMM's Adam: decay on the weight, outside the moments
                self.m1[i] = c.beta1 * self.m1[i] + (1 - c.beta1) * g
                self.m2[i] = c.beta2 * self.m2[i] + (1 - c.beta2) * g * g
                m_hat = self.m1[i] / (1 - c.beta1**self.t)
                v_hat = self.m2[i] / (1 - c.beta2**self.t)
                self.w[i] = w - lr * (m_hat / (math.sqrt(v_hat) + c.eps) + wd * w)

    def states(self) -> Dict[str, torch.Tensor]:
        """The reference states under the library's names."""
        if self.cfg.optimizer in ADAGRAD:
            return {"momentum1": torch.tensor(self.acc)}
        if self.cfg.optimizer in ADAM:
            return {"exp_avg": torch.tensor(self.m1), "exp_avg_sq": torch.tensor(self.m2), "step": torch.tensor(self.t)}
        return {}


def row_reference_setup(
    optimizer: EmbOptimType, weight_decay: float, n: int
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, float], RowReference]:
    """Random ``w`` of ``n`` entries, zero states, a param group and the ``RowReference`` over the same ``w``.

    Returns:
        Tuple: ``(weights, states, group, reference)``; the group's ``lr`` is 0 until a test sets it.
    """
    cfg = EntityWeightOptimizerConfig(optimizer=optimizer, eps=1e-3, beta1=0.8, beta2=0.9, weight_decay=weight_decay)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5
    states, group = zero_states_and_group(cfg, n)
    return weights, states, group, RowReference(weights, cfg)


def zero_states_and_group(
    cfg: EntityWeightOptimizerConfig, n: int, lr: float = 0.0
) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """Zero optimizer states for ``n`` entries of ``w`` (and Adam's step count) and ``cfg``'s param group at ``lr``."""
    states = {name: torch.zeros(n) for name in cfg.state_names()}
    if cfg.optimizer in ADAM:
        states["step"] = torch.zeros(())
    group = {"lr": lr, "eps": cfg.eps, "beta1": cfg.beta1, "beta2": cfg.beta2, "weight_decay": cfg.weight_decay}
    return states, group
