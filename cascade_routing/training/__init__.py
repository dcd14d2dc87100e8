"""Training the learned quality estimators with Lightning.

``module`` (the LightningModule around :class:`~cascade_routing.estimators.network.QualityNetwork`),
``datamodule`` (data, splits, cached embeddings), ``lightning_cli`` (the LightningCLI of ``train.py``
and ``train-eval``), ``export`` (the export callback and ``cascade-routing export --ckpt``, both
calling :func:`cascade_routing.calibration.export_trained`), ``heldout`` (the test-split evaluation of
an artifact against the paper-style baseline), ``distill`` (the small student encoder), ``loggers``.
"""
