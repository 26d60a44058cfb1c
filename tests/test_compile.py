"""`train.compile: true` (compiled.py): every trial of a long-lived worker runs compiled, and its
compilation is timed apart from training.

Dynamo's cheap "eager" backend stands in for inductor (which takes minutes per model on 2 cores): what
is tested is dynamo's side, the guards, caches and recompile limit, which every backend shares.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from ablations import compiled
from ablations.schema import SESpec
from ablations.train import train
from tests.helpers import tiny_cfg


@pytest.fixture
def eager_backend(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    yield
    torch.compiler.reset()


@pytest.mark.slow
def test_more_settings_than_the_recompile_limit_all_run_compiled_and_time_compiling_apart(
        tmp_path, eager_backend, monkeypatch):
    """A long-lived worker's trials in one process, one more than dynamo's recompile limit (lowered to
    2, so that 3 tiny trials suffice: each compiles train and eval versions of the same forward): with
    `fail_on_recompile_limit_hit`, a trial that would fall back to eager raises instead. Each trial's
    final record carries its compile_seconds, outside train_seconds and images/s."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    settings = [SESpec(), None, SESpec(reduction=4)]
    for i, se in enumerate(settings):
        before = compiled.dynamo_counts()
        cfg = tiny_cfg(epochs=1, compile=True).model_copy(update={"se": se, "setting": f"s{i}"})
        final = train(cfg, tmp_path / f"s{i}", progress=False)
        after = compiled.dynamo_counts()
        assert after["graphs"] - before["graphs"] == 2, i  # its own train and eval graphs, and no others

        # Compilation is timed apart: one epoch of 4 steps of this model takes a fraction of the time
        # dynamo needs to trace it twice; with the tracing inside, train_seconds would exceed it.
        assert 0 < final.train_seconds < final.compile_seconds, i
        ckpt = torch.load(tmp_path / f"s{i}" / "checkpoint.pt", weights_only=True)
        assert ckpt["compile_seconds"] == final.compile_seconds  # a resumed run adds to it


def test_evaluation_padded_to_the_compiled_batch_gives_the_same_numbers():
    import contextlib

    from ablations.data import load_data
    from ablations.distributed import Dist
    from ablations.patch import build_model
    from ablations.train import evaluate

    cfg = tiny_cfg(data={"eval_batch_size": 12})  # 16 validation images: batches of 12 and 4
    data = load_data(cfg, memory_format=torch.channels_last)
    model = build_model(cfg.backbone, cfg.se).to(memory_format=torch.channels_last)
    plain = evaluate(model, data, contextlib.nullcontext, Dist(), 4)
    padded = evaluate(model, data, contextlib.nullcontext, Dist(), 4, pad_to=12)
    assert padded == pytest.approx(plain, rel=1e-6)
    assert plain[0] > 0
