"""The fine-tuning path (GPU option): the query encoder trains, travels in the artifact, reloads."""

from __future__ import annotations

import torch

from cascade_routing.estimators.artifact import load_artifact
from cascade_routing.calibration.build import build_artifact

from estimators_helpers import train_tiny


def test_finetune_encoder_round_trip(tmp_path):
    module, dm, trainer, ds = train_tiny(tmp_path, n=120, m=2, epochs=1, finetune=True)
    assert module.network.encoder is not None
    art = build_artifact(module, dm, fit_lambdas=False, progress=False)
    assert any(k.startswith("encoder.") for k in art.state_dict)
    path = art.save(tmp_path / "ft.safetensors")
    loaded = load_artifact(path)
    test = dm.splits["test"].dataset
    rows = torch.arange(len(test.queries))
    ran = torch.zeros(len(rows), 2, dtype=torch.bool)
    q1, _ = art.bind(test.queries, test.responses, test.features, test.tasks)
    q2, _ = loaded.bind(test.queries, test.responses, test.features, test.tasks)
    torch.testing.assert_close(q1.estimate(rows, ran).mean, q2.estimate(rows, ran).mean)
    # the encoder was trained, and the bound estimator uses the fine-tuned weights
    from cascade_routing.estimators.encoding import TextEncoder

    before = TextEncoder.from_path(dm.resolved_encoder_path).state_dict()
    after = module.network.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from cascade_routing.calibration.binding import bind_split

    q3, _ = bind_split(loaded, dm.splits["test"])
    torch.testing.assert_close(q3.estimate(rows, ran).mean, q2.estimate(rows, ran).mean, atol=1e-5, rtol=1e-4)


def test_finetuned_module_loads_from_checkpoint(tmp_path):
    """The fine-tuned encoder is rebuilt from ``encoder_init_path`` and its trained weights restored."""
    from cascade_routing.training.module import QualityEstimatorModule

    module, dm, trainer, ds = train_tiny(tmp_path, n=120, m=2, epochs=1, finetune=True)
    assert module.hparams.encoder_init_path == dm.resolved_encoder_path
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    loaded = QualityEstimatorModule.load_from_checkpoint(tmp_path / "ft.ckpt", map_location="cpu")
    want = module.network.encoder.state_dict()
    got = loaded.network.encoder.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k].cpu()) for k in want)
