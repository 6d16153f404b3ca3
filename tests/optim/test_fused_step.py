"""``w``'s fused gradient-and-update (``optim.fused_step``): the compiled op and the ATen fallback against a
plain-PyTorch reference, the op's input checks, and the fallback where the op is missing.

The reference computes ``grad_w`` by autograd through ``sum_j w[p_j] * U[r_j]`` per bag and applies the
update rule one scalar at a time (``reference.RowReference``, float64). Both implementations must match
it within 1e-6 over several steps, for every optimizer family, with and without weight decay, for two
features of one table whose ids repeat within and across features, an empty bag, and output gradients
that are column slices of a wider tensor.
"""

import os
import subprocess
import sys
from typing import List, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from memcom_torchrec.optim import fused_step
from memcom_torchrec.optim.entity_weight_optimizer import EntityWeightOptimizerConfig
from memcom_torchrec.optim.fused_step import ATEN, COMPILED, FeatureGradient, entity_weight_step_
from dist_utils import require_kernel
from reference import row_reference_setup, zero_states_and_group

N, M, D = 40, 7, 12  # entities (flat w), rows of U, width
OPTIMIZERS = [EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.ADAM]
TOL = dict(atol=1e-6, rtol=1e-6)


def make_features(g: torch.Generator, grad_width: int = 2 * D + 3) -> Tuple[torch.Tensor, List[FeatureGradient]]:
    """Two features of one table (bags of 0-5 ids, bag 1 of the first empty), their gradients as column
    slices of one ``B x grad_width`` output gradient; positions repeat within and across the features."""
    out = torch.randn(6, grad_width, generator=g)
    features = []
    for f, col in enumerate((0, D + 3)):
        lengths = torch.randint(0, 6, (6,), generator=g)
        if f == 0:
            lengths[1] = 0
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        k = int(offsets[-1])
        positions = torch.randint(0, N // 2, (k,), generator=g)  # half the entities: many duplicates
        features.append(FeatureGradient(grad=out[:, col : col + D], rows=positions % M, bag_offsets=offsets,
                                        positions=positions))
    return out, features


def autograd_grad(w: torch.Tensor, U: torch.Tensor, features: List[FeatureGradient]) -> torch.Tensor:
    """Dense ``grad_w`` of ``sum_f <pool_f, grad_f>``, ``pool_f[b] = sum_j w[p_j] U[r_j]``, by autograd."""
    w = w.detach().double().requires_grad_()
    loss = torch.zeros((), dtype=torch.float64)
    for f in features:
        for b in range(f.grad.shape[0]):
            lo, hi = int(f.bag_offsets[b]), int(f.bag_offsets[b + 1])
            pooled = (w[f.positions[lo:hi]].unsqueeze(1) * U.double()[f.rows[lo:hi]]).sum(0)
            loss = loss + (pooled * f.grad[b].double()).sum()
    loss.backward()
    return w.grad


@pytest.mark.parametrize("implementation", [COMPILED, ATEN])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=str)
def test_step_matches_autograd_reference(optimizer: EmbOptimType, weight_decay: float, implementation: str) -> None:
    if implementation == COMPILED:
        require_kernel(COMPILED)
    w, states, group, ref = row_reference_setup(optimizer, weight_decay, N)
    g = torch.Generator().manual_seed(1)
    U = torch.randn(M, D, generator=g)
    for lr in (0.1, 0.05, 0.2):  # three steps (Adam's bias correction moves), lr read at each
        _, features = make_features(g)
        dense = autograd_grad(w, U, features)
        touched = sorted(set(torch.cat([f.positions for f in features]).tolist()))
        group["lr"] = lr
        untouched_before = w[[i for i in range(N) if i not in touched]].clone()
        entity_weight_step_(w, states, U, features, group, optimizer, implementation=implementation)
        ref.step(touched, [float(dense[i]) for i in touched], lr)
        torch.testing.assert_close(w, torch.tensor(ref.w, dtype=torch.float32), **TOL)
        for name, value in ref.states().items():
            torch.testing.assert_close(states[name].float(), value.float(), **TOL)
        assert torch.equal(w[[i for i in range(N) if i not in touched]], untouched_before)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=str)
def test_compiled_equals_aten_at_scale(optimizer: EmbOptimType) -> None:
    """40,000 ids over 2,000 entities (heavy duplication), 64 wide, 3 steps: the two paths agree within 1e-6."""
    require_kernel(COMPILED)
    g = torch.Generator().manual_seed(2)
    n, m, d, batch = 2000, 97, 64, 512
    U = torch.randn(m, d, generator=g) * 0.1
    runs = {}
    for implementation in (COMPILED, ATEN):
        w = torch.ones(n)
        states, group = zero_states_and_group(EntityWeightOptimizerConfig(optimizer=optimizer, weight_decay=0.01), n, 0.05)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            lengths = torch.randint(0, 160, (batch,), generator=gen)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            positions = torch.randint(0, n, (int(offsets[-1]),), generator=gen)
            grad = torch.randn(batch, d, generator=gen) * 0.01
            feature = FeatureGradient(grad=grad, rows=positions % m, bag_offsets=offsets, positions=positions)
            entity_weight_step_(w, states, U, [feature], group, optimizer, implementation=implementation)
        runs[implementation] = (w, states)
    torch.testing.assert_close(runs[COMPILED][0], runs[ATEN][0], **TOL)
    for name in runs[ATEN][1]:
        torch.testing.assert_close(runs[COMPILED][1][name], runs[ATEN][1][name], **TOL)


def _bad(features: List[FeatureGradient], **change) -> List[FeatureGradient]:
    f = features[0]
    return [FeatureGradient(**{**f.__dict__, **change})] + features[1:]


BAD_INPUTS = {
    "row out of range": (lambda fs, U: _bad(fs, rows=fs[0].rows + M), r"rows\[0\]\[\d+\] = \d+ is outside U's 7 rows"),
    "negative position": (lambda fs, U: _bad(fs, positions=fs[0].positions - N), r"positions\[0\]\[\d+\] = -\d+ is outside w's 40 entries"),
    "wrong width": (lambda fs, U: _bad(fs, grad=fs[0].grad[:, :5]), r"grads\[0\] must be a float32 CPU B x 12 matrix"),
    "int32 rows": (lambda fs, U: _bad(fs, rows=fs[0].rows.int()), r"rows\[0\] must be a contiguous 1-D int64 CPU tensor"),
    "offsets past the ids": (lambda fs, U: _bad(fs, bag_offsets=fs[0].bag_offsets + 1), r"bag_offsets\[0\] must start at 0 and end at"),
    "offsets for other bags": (lambda fs, U: _bad(fs, bag_offsets=fs[0].bag_offsets[:-1]), r"bag_offsets\[0\] has 6 entries for 6 bags"),
    "positions and rows differ": (lambda fs, U: _bad(fs, positions=fs[0].positions[:-1]), r"positions\[0\] has \d+ entries, rows\[0\] has"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_compiled_op_checks_its_input_before_writing(case: str) -> None:
    """Each bad input raises a message naming the tensor and the value; ``w`` and the states stay untouched."""
    require_kernel(COMPILED)
    w, states, group, _ = row_reference_setup(EmbOptimType.EXACT_ADAGRAD, 0.0, N)
    group["lr"] = 0.1
    g = torch.Generator().manual_seed(4)
    U = torch.randn(M, D, generator=g)
    _, features = make_features(g)
    make, message = BAD_INPUTS[case]
    before = (w.clone(), states["momentum1"].clone())
    with pytest.raises(RuntimeError, match=message):
        entity_weight_step_(w, states, U, make(features, U), group, EmbOptimType.EXACT_ADAGRAD, implementation=COMPILED)
    assert torch.equal(w, before[0]) and torch.equal(states["momentum1"], before[1])


def test_compiled_op_checks_states_and_rule() -> None:
    require_kernel(COMPILED)
    w = torch.ones(N)
    U = torch.randn(M, D)
    _, features = make_features(torch.Generator().manual_seed(5))
    args = ([f.grad for f in features], U, [f.rows for f in features], [f.bag_offsets for f in features],
            [f.positions for f in features])
    op = torch.ops.memcom.entity_weight_step_
    with pytest.raises(RuntimeError, match="rule 1 takes 1 state tensor"):
        op(w, [], *args, 1, 0.1, 1e-8, 0.9, 0.999, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="a state has 39 entries, expected 40"):
        op(w, [torch.zeros(N - 1)], *args, 1, 0.1, 1e-8, 0.9, 0.999, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="unknown rule 7"):
        op(w, [], *args, 7, 0.1, 1e-8, 0.9, 0.999, 0.0, 0.0)
    # the op itself reads float32 only (the Python wrapper widens other dtypes first)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be a float32 CPU B x 12 matrix"):
        op(w, [], [args[0][0].double(), args[0][1]], *args[1:], 0, 0.1, 1e-8, 0.9, 0.999, 0.0, 0.0)
    assert torch.equal(w, torch.ones(N))


def test_missing_library_falls_back_with_one_warning_line(tmp_path) -> None:
    """Where the op was not built, training takes the ATen path and says so once, in one line."""
    code = (
        "import memcom_torchrec.optim.fused_step as f\n"
        f"f.LIBRARY = {str(tmp_path / 'missing.so')!r}\n"
        "print(f.kernel()); f.set_kernel(None); print(f.kernel())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MEMCOM_ENTITY_WEIGHT_KERNEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [ATEN, ATEN]
    warning = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].endswith(
        "the fused w kernel is not built (python -m memcom_torchrec.optim.build_ops); training w on the ATen fallback"
    ), done.stderr


def test_environment_chooses_the_fallback_and_bad_names_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMCOM_ENTITY_WEIGHT_KERNEL", ATEN)
    fused_step.set_kernel(None)
    try:
        assert fused_step.kernel() == ATEN
        monkeypatch.setenv("MEMCOM_ENTITY_WEIGHT_KERNEL", "cuda")
        fused_step.set_kernel(None)
        with pytest.raises(ValueError, match="MEMCOM_ENTITY_WEIGHT_KERNEL='cuda': use 'compiled' or 'aten'"):
            fused_step.kernel()
    finally:
        monkeypatch.delenv("MEMCOM_ENTITY_WEIGHT_KERNEL")
        fused_step.set_kernel(None)
