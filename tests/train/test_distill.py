"""Distillation: the loss against a plain-PyTorch reference, the trainer with a sharded frozen teacher.

- ``a = 0`` trains bit for bit like no teacher at all (same checkpoint tensors);
- the KD term's gradient is the closed form ``a T (softmax(s/T) - softmax(t/T)) / rows``;
- the teacher's parameters never change, and its soft targets and the student's loss on 2 gloo
  ranks equal those on 1 for the same global batch;
- the student's checkpoints record the teacher; a resume needs the same teacher;
- bad input (no or incompatible teacher, another catalogue or history, ``a`` outside [0, 1],
  ``T <= 0``) is refused by ``check_teacher`` / ``TrainConfig``, which ``train`` runs before any work.
"""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

from checkpoint_utils import assert_same_checkpoint
from dist_utils import MultiProcessFailure, run_multiprocess, train_body
from memcom_torchrec.data import read_manifest
from memcom_torchrec.models.next_item import distillation_loss
from memcom_torchrec.train.config import TrainConfig
from memcom_torchrec.train.distill import check_teacher

STEPS = 16


def _cfg(ml100k_dir: str, out: str, **kw) -> TrainConfig:
    base = dict(data_dir=ml100k_dir, out_dir=out, model="next_item", scorer="tied", use_user_id=False, history_len=5,
                embedding_dim=16, hidden=[32], batch_size=128, epochs=1, max_steps=STEPS, checkpoint_every=8,
                eval_batch_size=1024, eval_users=256, device="cpu", seed=3, dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def runs(ml100k_dir: str, tmp_path_factory):
    """A teacher (uncompressed, linear scorer, with a user id: server-shaped) and a distilled phone student."""
    root = tmp_path_factory.mktemp("kd")
    teacher = _cfg(ml100k_dir, str(root / "teacher"), method="uncompressed", scorer="linear", use_user_id=True)
    run_multiprocess(train_body, world_size=2, cfg=teacher)
    student = _cfg(ml100k_dir, str(root / "student"), method="memcom_qr", compression_ratio=8.0,
                   teacher=teacher.out_dir, distill_alpha=0.5, distill_temperature=2.0)
    run_multiprocess(train_body, world_size=2, cfg=student)
    return {"root": root, "teacher": teacher, "student": student}


def test_loss_and_its_gradient_match_the_reference():
    torch.manual_seed(0)
    n, items, a, t = 6, 11, 0.3, 2.5
    s = torch.randn(n, items, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, items, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 0, 10, -1, 7, -1])  # two padding rows
    loss = distillation_loss(s, labels, teacher, a, t)
    grad_s, grad_teacher = torch.autograd.grad(loss, [s, teacher], allow_unused=True)
    assert grad_teacher is None  # the teacher's logits are targets
    # plain PyTorch: the formula written out, mean over the 4 real rows
    real = labels >= 0
    p_t, log_p_t = torch.softmax(teacher / t, 1), torch.log_softmax(teacher / t, 1)
    kl = (p_t * (log_p_t - torch.log_softmax(s / t, 1))).sum(1)
    ce = -torch.log_softmax(s, 1)[real].gather(1, labels[real][:, None]).squeeze(1)
    ref = ((1 - a) * ce + a * t * t * kl[real]).sum() / real.sum()
    assert torch.allclose(loss, ref, atol=1e-12, rtol=0)
    # the gradient in closed form: CE's softmax - onehot, KD's T (softmax(s/T) - softmax(t/T))
    onehot = torch.zeros(n, items, dtype=torch.float64)
    onehot[real.nonzero().squeeze(1), labels[real]] = 1
    ref_grad = ((1 - a) * (torch.softmax(s, 1) - onehot) + a * t * (torch.softmax(s / t, 1) - p_t)) * real[:, None]
    assert torch.allclose(grad_s, ref_grad.detach() / real.sum(), atol=1e-12, rtol=0)
    # a = 0: exactly the cross-entropy the trainer uses without a teacher
    plain = nn.functional.cross_entropy(s, labels, reduction="sum", ignore_index=-1) / real.sum()
    assert torch.equal(distillation_loss(s, labels, teacher, 0.0, t), plain)


@pytest.mark.slow
def test_alpha_zero_trains_like_no_teacher(runs, tmp_path):
    teacher = runs["teacher"].out_dir
    with_teacher = _cfg(runs["teacher"].data_dir, str(tmp_path / "a0"), method="memcom_qr", compression_ratio=8.0,
                        teacher=teacher, distill_alpha=0.0)
    without = replace(with_teacher, out_dir=str(tmp_path / "plain"), teacher="")
    for cfg in (with_teacher, without):
        run_multiprocess(train_body, world_size=2, cfg=cfg)
    step = f"step_{STEPS:08d}"
    assert_same_checkpoint(os.path.join(with_teacher.out_dir, "checkpoints", step),
                           os.path.join(without.out_dir, "checkpoints", step))


@pytest.mark.slow
def test_student_records_its_teacher_and_resumes_only_with_it(runs):
    student = runs["student"]
    meta_path = os.path.join(student.out_dir, "checkpoints", f"step_{STEPS:08d}", "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    teacher_ckpt = os.path.join(runs["teacher"].out_dir, "checkpoints", f"step_{STEPS:08d}")
    assert meta["teacher"]["path"] == os.path.abspath(teacher_ckpt) and meta["teacher"]["step"] == STEPS
    assert sorted(k.split(":")[-1] for k in meta["teacher"]["tables"]) == ["item", "user"]  # the server-shaped one
    assert meta["config"]["teacher"] == runs["teacher"].out_dir and meta["config"]["distill_alpha"] == 0.5
    # resume: a copy of the student, 8 more steps
    resumed = replace(student, out_dir=str(runs["root"] / "resumed"), max_steps=STEPS + 8)
    shutil.copytree(student.out_dir, resumed.out_dir)
    run_multiprocess(train_body, world_size=2, cfg=resumed)
    with open(os.path.join(resumed.out_dir, "metrics.json")) as f:
        m = json.load(f)
    assert m["steps"] == STEPS + 8 and m["resumed_from_steps"] == [STEPS]
    # the same checkpoints without the teacher: refused, naming both
    shutil.rmtree(resumed.out_dir)
    shutil.copytree(student.out_dir, resumed.out_dir)
    with pytest.raises(MultiProcessFailure, match=r"was trained with teacher .*step 16\), this run has no teacher"):
        run_multiprocess(train_body, world_size=2, cfg=replace(resumed, teacher=""))


def _local(value) -> list:  # pyre-ignore
    """This rank's tensors of a state-dict value (a ShardedTensor's local shards, or the tensor)."""
    if hasattr(value, "local_shards"):
        return [s.tensor for s in value.local_shards()]
    return [value]


def soft_targets_body(rank: int, world_size: int, student: TrainConfig, student_ckpt: str, rows: int, out: str):
    """One global batch of ``rows`` training rows, split evenly over the ranks: the teacher's logits
    (gathered) and the student's distillation loss (averaged); the teacher unchanged after the student's step."""
    import torch.distributed as dist

    from memcom_torchrec.data import make_dataloader
    from memcom_torchrec.data.reader import Batch
    from memcom_torchrec.models.builder import build_model
    from memcom_torchrec.models.checkpoint import load_checkpoint
    from memcom_torchrec.train.distill import load_teacher
    from memcom_torchrec.train.trainer import build_optimizer, shard_model
    from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

    device = torch.device("cpu")
    manifest = read_manifest(student.data_dir)
    spec = check_teacher(student, manifest)
    teacher = load_teacher(spec, student, lambda c, m, t: shard_model(c, m, t, world_size, device))
    before = {k: [t.clone() for t in _local(v)] for k, v in teacher.model.state_dict().items()}

    whole = next(iter(make_dataloader(student.data_dir, "train", rows, 0, 1, shuffle=False,
                                      history_len=student.history_len, with_user=True)))
    half = rows // world_size
    mine = slice(rank * half, (rank + 1) * half)
    kjt = whole.sparse_features
    features = KeyedJaggedTensor.from_jt_dict(
        {k: JaggedTensor.from_dense(kjt[k].to_dense()[mine]) for k in kjt.keys()})
    batch = teacher.attach(Batch(sparse_features=features, labels=whole.labels[mine]))

    no_dropout = replace(student, dropout=0.0)  # the same parameters, a deterministic training forward
    model, tables = build_model(no_dropout, int(manifest["num_users"]), int(manifest["num_items"]),
                                torch.device("meta"), seed=student.seed)
    model.distill = (student.distill_alpha, student.distill_temperature)
    model = shard_model(no_dropout, model, tables, world_size, device)
    load_checkpoint(student_ckpt, model)
    optimizer, _ = build_optimizer(no_dropout, model)
    loss, _ = model(batch)
    loss.backward()
    optimizer.step()
    for k, v in teacher.model.state_dict().items():
        assert all(torch.equal(a, b) for a, b in zip(_local(v), before[k])), f"teacher's {k} changed"

    logits = [torch.zeros_like(batch.soft_targets) for _ in range(world_size)]
    dist.all_gather(logits, batch.soft_targets.contiguous())
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"logits": torch.cat(logits), "loss": total / world_size}, out)


@pytest.mark.slow
def test_soft_targets_and_loss_on_two_ranks_equal_one_and_the_teacher_never_changes(runs, tmp_path):
    student = runs["student"]
    ckpt = os.path.join(student.out_dir, "checkpoints", f"step_{STEPS:08d}")
    got = {}
    for world in (1, 2):
        out = str(tmp_path / f"w{world}.pt")
        run_multiprocess(soft_targets_body, world_size=world, student=student, student_ckpt=ckpt, rows=64, out=out)
        got[world] = torch.load(out)
    assert got[1]["logits"].shape == (64, 1682)
    assert torch.allclose(got[1]["logits"], got[2]["logits"], atol=1e-5, rtol=0)
    assert torch.allclose(got[1]["loss"], got[2]["loss"], atol=1e-5, rtol=0)


def test_bad_teacher_or_settings_are_refused_before_any_work(runs, tmp_path):
    data = runs["teacher"].data_dir
    manifest = read_manifest(data)
    student = _cfg(data, str(tmp_path / "s"), method="memcom_qr", compression_ratio=8.0,
                   teacher=runs["teacher"].out_dir)
    assert check_teacher(student, manifest).config.scorer == "linear"
    with pytest.raises(ValueError, match=r"^--teacher: no checkpoint at /nowhere"):
        check_teacher(replace(student, teacher="/nowhere"), manifest)
    with pytest.raises(ValueError, match=r"trained with --history-len 5, the student has 10"):
        check_teacher(replace(student, history_len=10), manifest)
    # a copy of the teacher's checkpoint with its meta.json edited: another kind, another catalogue
    src = check_teacher(student, manifest).path
    for edit, message in [
        (lambda m: m["config"].update(model="ranknet", scorer="dot"), r"a 'ranknet' model; distillation needs"),
        (lambda m: [sig.update(num_embeddings=1000) for k, sig in m["tables"].items() if k.endswith("item")],
         r"its catalogue has 1000 items, this dataset 1682"),
        (lambda m: [sig.update(num_embeddings=900) for k, sig in m["tables"].items() if k.endswith("user")],
         r"its user table has 900 rows, this dataset 943 users"),
    ]:
        copy = str(tmp_path / "t")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(src, copy)
        with open(os.path.join(copy, "meta.json")) as f:
            meta = json.load(f)
        edit(meta)
        with open(os.path.join(copy, "meta.json"), "w") as f:
            json.dump(meta, f)
        with pytest.raises(ValueError, match=message):
            check_teacher(replace(student, teacher=copy), manifest)
    for kw, message in [({"distill_alpha": 1.5}, r"--distill-alpha 1.5 is outside \[0, 1\]"),
                        ({"distill_alpha": -0.1}, r"--distill-alpha -0.1 is outside \[0, 1\]"),
                        ({"distill_temperature": 0.0}, r"--distill-temperature 0.0 must be > 0"),
                        ({"model": "ranknet", "scorer": "dot"}, r"--teacher needs --model next_item")]:
        with pytest.raises(ValueError, match=message):
            _cfg(data, str(tmp_path / "s"), teacher="t", **kw)
