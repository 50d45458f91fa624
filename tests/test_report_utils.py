import json
import os

import pytest

from hydra_rank.loop import WarmupCosine, rebind_optimizer
from hydra_rank.report import write_report
from hydra_rank.utils import JsonlWriter, atomic_directory, atomic_write_text, read_jsonl


def test_warmup_then_cosine_to_zero_and_resize_ramp():
    import torch

    schedule = WarmupCosine(lr=1.0, warmup_steps=2, total_steps=6, resize_warmup_steps=2)
    rates = [schedule.factor(step) for step in range(1, 7)]
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert rates[2] > rates[3] > rates[4] > rates[5] > 0
    assert schedule.factor(7) == pytest.approx(0.0)
    old, new = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([old])
    optimizer.add_param_group({"params": [new], "born": 3})
    assert schedule.apply(optimizer, 4) == pytest.approx(rates[3])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([rates[3], rates[3] / 2])
    schedule.apply(optimizer, 5)
    assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"]  # ramp over


def test_rebind_keeps_state_of_surviving_parameters():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    kept = model[0].weight
    moments = optimizer.state[kept]["exp_avg"].clone()
    model[1] = torch.nn.Linear(2, 1)  # "resized": new parameters
    rebind_optimizer(optimizer, model, step=7)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert torch.equal(optimizer.state[kept]["exp_avg"], moments)
    assert optimizer.param_groups[-1]["born"] == 7 and model[1].weight not in optimizer.state
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # the new parameters train
    assert optimizer.state[model[1].weight]["step"] == 1


def test_atomic_directory_keeps_the_old_copy_when_the_write_fails(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("good")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("crash while saving")
    assert (target / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging debris


def test_atomic_files_get_normal_permissions(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_report_has_table_and_curves(tmp_path):
    for name, loss in (("lora", 1.0), ("other", 2.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"method": name, "eval_accuracy": 0.5, "eval_loss": loss}))
        log = JsonlWriter(run / "log.jsonl")
        for step in range(1, 4):
            log.write({"step": step, "loss": loss / step, **({"eval_loss": loss} if step == 2 else {})})
        log.close()
        assert len(read_jsonl(run / "log.jsonl")) == 3
    page = write_report(tmp_path, {"lora": tmp_path / "lora", "other": tmp_path / "other"}).read_text()
    assert page.count("<tr>") == 3 and "2.0000" in page and "loss_curves.png" in page
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
