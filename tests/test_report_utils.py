import json
import os

import pytest

from hydra_rank.loop import warmup_cosine
from hydra_rank.report import write_report
from hydra_rank.utils import JsonlWriter, atomic_directory, atomic_write_text, read_jsonl


def test_warmup_then_cosine_to_zero():
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup_steps=2, total_steps=6)
    rates = []
    for _ in range(6):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert rates[2] > rates[3] > rates[4] > rates[5] > 0
    assert schedule.get_last_lr()[0] == pytest.approx(0.0)


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
