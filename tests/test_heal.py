import copy
import json

import pytest
import torch

from rankwise import CompressConfig, RankwiseError, compress_, evaluate, load
from rankwise.cli import main
from rankwise.models.layers import LowRankLinear
from rankwise.train.distill import DistillTask, kl_to_teacher
from rankwise.train.heal import HealConfig, heal


def test_kl_to_teacher_full_and_top_k():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 40, generator=g)
    teacher = torch.log_softmax(2 * torch.randn(2, 5, 40, generator=g), -1)
    logq = torch.log_softmax(student, -1)
    full = (teacher.exp() * (teacher - logq)).sum(-1).mean()
    torch.testing.assert_close(kl_to_teacher(student, teacher), full)
    everything = teacher.topk(40, -1)
    torch.testing.assert_close(kl_to_teacher(student, (everything.values, everything.indices)),
                               full, atol=1e-5, rtol=1e-5)
    for k in (1, 5, 20):     # coarsening to top-k + rest can only lose divergence
        top = teacher.topk(k, -1)
        assert 0 <= float(kl_to_teacher(student, (top.values, top.indices))) <= float(full) + 1e-6


@pytest.fixture
def student_and_teacher(tiny, calib):
    teacher = copy.deepcopy(tiny)
    compress_(tiny, CompressConfig(metric="kfac", ratio=0.6, allocation="uniform", cut="oneshot"),
              calib, progress=False)
    return tiny, teacher


def _task(teacher, steps, topk=None):
    g = torch.Generator().manual_seed(7)
    windows = torch.randint(0, 256, (24, 32), generator=g)
    return DistillTask(teacher, windows, windows[:4], batch_size=4, steps=steps, topk=topk,
                       progress=False)


@pytest.mark.parametrize("topk", [None, 64])
def test_healing_brings_the_student_toward_the_teacher_and_moves_only_factors(
        student_and_teacher, heldout, topk):
    student, teacher = student_and_teacher
    before = evaluate(student, heldout, reference=teacher, progress=False).kl
    frozen = {n: p.detach().clone() for n, p in student.named_parameters()
              if not n.endswith((".A.weight", ".B.weight"))}
    result = heal(student, _task(teacher, 40, topk), HealConfig(steps=40, lr=3e-3, warmup_steps=2),
                  progress=False)
    after = evaluate(student, heldout, reference=teacher, progress=False).kl
    assert after < 0.8 * before and result.steps == 40
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    factors = sum(m.A.weight.numel() + m.B.weight.numel() for m in student.modules()
                  if isinstance(m, LowRankLinear))
    assert result.trained_params == factors


def test_norms_and_biases_train_when_asked(student_and_teacher):
    student, teacher = student_and_teacher
    norm = student.model.layers[0].input_layernorm.weight.detach().clone()
    heal(student, _task(teacher, 3), HealConfig(steps=3, lr=1e-2, train_norms=True), progress=False)
    assert not torch.equal(norm, student.model.layers[0].input_layernorm.weight)


def test_a_time_budget_stops_early(student_and_teacher):
    student, teacher = student_and_teacher
    result = heal(student, _task(teacher, 1000), HealConfig(steps=1000, seconds=0.5),
                  progress=False)
    assert 1 <= result.steps < 1000 and result.seconds >= 0.5


class _Stop(Exception):
    pass


def test_heal_resumes_to_the_same_state(student_and_teacher, tmp_path):
    student, teacher = student_and_teacher
    config = HealConfig(steps=8, lr=1e-3, warmup_steps=2)
    start = copy.deepcopy(student)
    straight = heal(copy.deepcopy(start), _task(teacher, 8), config, progress=False)

    class Interrupted(DistillTask):
        def batch(self, step):
            if step == 5:
                raise _Stop
            return super().batch(step)
    task = _task(teacher, 8)
    task.__class__ = Interrupted
    ckpt = tmp_path / "heal.pt"
    with pytest.raises(_Stop):
        heal(copy.deepcopy(start), task, config, ckpt, checkpoint_every=2, progress=False)
    resumed = copy.deepcopy(start)
    result = heal(resumed, _task(teacher, 8), config, ckpt, checkpoint_every=2, resume=True,
                  progress=False)
    assert result.losses == straight.losses
    with pytest.raises(RankwiseError, match="written with other options"):
        heal(resumed, _task(teacher, 8), HealConfig(steps=8, lr=2e-3), ckpt, resume=True,
             progress=False)


def test_heal_needs_factors(tiny):
    with pytest.raises(RankwiseError, match="no factorized layers"):
        heal(tiny, _task(tiny, 2), HealConfig(steps=2), progress=False)


def test_heal_verb_writes_an_ordinary_output(tiny_folder, tmp_path, capsys):
    out, healed = tmp_path / "c", tmp_path / "h"
    assert main(["compress", "--model", str(tiny_folder), "--ratio", "0.5", "--calib-samples", "4",
                 "--seqlen", "32", "--out", str(out)]) == 0
    assert main(["heal", str(out), "--out", str(healed), "--steps", "3", "--windows", "6",
                 "--seqlen", "32", "--teacher-topk", "16"]) == 0
    text = capsys.readouterr().out
    assert "healed" in text and "KL to the teacher" in text
    manifest = json.loads((healed / "rankwise.json").read_text())
    assert manifest["heal"]["steps_done"] == 3 and manifest["structure"] == json.loads(
        (out / "rankwise.json").read_text())["structure"]
    model = load(healed)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert main(["heal", str(tiny_folder), "--out", str(tmp_path / "x")]) == 2
    assert "not a rankwise output" in capsys.readouterr().err
