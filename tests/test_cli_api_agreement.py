"""The command line and the Python API agree: each ``cascade-routing`` subcommand that wraps a public
function has that function's defaults, and a bad argument is refused by the same check through both
(the CLI as one ``error: ...`` line or an argparse error naming the flag, exit status 2; the API as a
``ValueError`` naming the setting), before any work. Each test fails on the code before its fix."""

from __future__ import annotations

import inspect

import pytest

from cascade_routing.cli import build_parser, main


def _cli_defaults(argv: list[str]) -> dict:
    """The parsed defaults of a subcommand given only its required arguments."""
    return vars(build_parser().parse_args(argv))


def test_strategy_errors_are_the_evaluate_functions_own(capsys):
    """``evaluate --strategies bogus`` checked the names itself, with another message than
    ``evaluate(strategies=...)``; the CLI now hands the names to the function, which refuses them
    before loading anything (the checkpoint here does not exist)."""
    from cascade_routing.training.heldout import evaluate

    with pytest.raises(ValueError) as api:
        evaluate("missing.safetensors", out_dir=None, strategies=("routing", "bogus"), log_wandb=False)
    assert main(["evaluate", "--checkpoint", "missing.safetensors", "--strategies", "routing,bogus",
                 "--no-wandb", "--out", "unused"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {api.value}"


def test_an_unknown_uncertainty_is_refused_before_anything_loads():
    """``evaluate --uncertainty`` only takes variance/covariance/none (argparse choices); ``evaluate(
    uncertainty="bogus")`` loaded the artifact and the dataset first (a missing checkpoint hid the
    bad setting). Both now check it up front against the estimators' own list."""
    from cascade_routing.estimators.learned import UNCERTAINTY_MODES
    from cascade_routing.training.heldout import evaluate

    with pytest.raises(ValueError, match="uncertainty must be one of .* got 'bogus'"):
        evaluate("missing.safetensors", out_dir=None, uncertainty="bogus", log_wandb=False)
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    choices = next(a.choices for a in commands["evaluate"]._actions if a.dest == "uncertainty")
    assert tuple(choices) == tuple(UNCERTAINTY_MODES)


@pytest.mark.parametrize("setting, value", [("budgets_per_pair", 0), ("num_resamples", 0),
                                            ("budgets_per_pair", -1), ("estimators", ("bogus",))])
def test_train_eval_refuses_bad_settings_before_training(monkeypatch, setting, value):
    """``train-eval --budgets-per-pair 0`` is an argparse error; ``train_eval(budgets_per_pair=0)``
    silently evaluated at the protocol's 5 (``0 or 5``), and a negative count or an unknown estimator
    was refused by ``evaluate`` only after the whole training. Now a ValueError naming the setting,
    before training starts."""
    from cascade_routing.cli import estimator_commands
    from cascade_routing.training import lightning_cli

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(lightning_cli, "lightning_cli", no_training)
    with pytest.raises(ValueError, match=setting):
        estimator_commands.train_eval("routerbench", out="unused", log_wandb=False, **{setting: value})


def test_export_refuses_bad_budgets_per_pair_before_any_work(tmp_path, monkeypatch, capsys):
    """``export --budgets-per-pair 0`` is an argparse error; ``export_checkpoint(budgets_per_pair=0)``
    rebuilt the data, calibrated and selected the uncertainty, then failed with ``per_pair must be an
    integer >= 1``, and ``train.py fit`` with ``ExportArtifact``'s ``budgets_per_pair: 0`` trained first.
    Each now refuses it before any work, naming ``budgets_per_pair``."""
    import yaml

    from cascade_routing.training.export import ExportArtifact, export_checkpoint
    from tests.test_training_edges_cli import _config, _train_py

    with pytest.raises(ValueError, match="budgets_per_pair must be an integer >= 1, got 0"):
        export_checkpoint("missing.ckpt", "unused/x.safetensors", budgets_per_pair=0)
    with pytest.raises(ValueError, match="budgets_per_pair must be an integer >= 1, got 2.5"):
        ExportArtifact(budgets_per_pair=2.5)  # refused when constructed, before any Trainer uses it
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(_config(tmp_path).read_text())
    config["trainer"]["callbacks"] = [{"class_path": "cascade_routing.training.export.ExportArtifact",
                                       "init_args": {"budgets_per_pair": 0}}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert _train_py().run(["fit", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: ExportArtifact budgets_per_pair must be an integer >= 1, got 0" in err and "Subtypes" not in err
    assert not (tmp_path / "runs").exists()  # nothing trained


def _function_defaults(function) -> dict:
    return {k: p.default for k, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_cli_defaults_are_the_functions_defaults():
    """Every flag of ``evaluate``, ``train-eval``, ``export`` and ``reproduce routerbench`` defaults to
    the wrapped function's default. ``train_eval``'s signature said ``budgets_per_pair=None,
    num_resamples=None`` (meaning the protocol's 5 and 200, which the CLI showed)."""
    from cascade_routing.cli.estimator_commands import train_eval
    from cascade_routing.evaluation.reproduce import reproduce_routerbench
    from cascade_routing.training.export import export_checkpoint
    from cascade_routing.training.heldout import evaluate

    ev, ev_cli = _function_defaults(evaluate), _cli_defaults(["evaluate", "--checkpoint", "x"])
    assert (ev_cli["out"], ev_cli["budgets_per_pair"], ev_cli["resamples"], ev_cli["uncertainty"], ev_cli["dataset"]) == \
        (ev["out_dir"], ev["budgets_per_pair"], ev["num_resamples"], ev["uncertainty"], ev["dataset"])
    te, te_cli = _function_defaults(train_eval), _cli_defaults(["train-eval"])
    assert (te_cli["budgets_per_pair"], te_cli["resamples"], te_cli["out"]) == \
        (te["budgets_per_pair"], te["num_resamples"], te["out"])
    assert (te["budgets_per_pair"], te["num_resamples"]) == (ev["budgets_per_pair"], ev["num_resamples"])
    assert te["estimators"] == ev["estimators"]
    ex, ex_cli = _function_defaults(export_checkpoint), _cli_defaults(["export", "--ckpt", "x"])
    assert (ex_cli["budgets_per_pair"], ex_cli["out"]) == (ex["budgets_per_pair"], ex["path"])
    rp, rp_cli = _function_defaults(reproduce_routerbench), _cli_defaults(["reproduce", "routerbench"])
    assert (rp_cli["out"], rp_cli["seed"], rp_cli["num_samples"], rp_cli["resamples"], rp_cli["budgets_per_pair"],
            rp_cli["device"], rp_cli["quick"]) == \
        (rp["out_dir"], rp["seed"], rp["num_samples"], rp["num_resamples"], rp["budgets_per_pair"],
         rp["device"], rp["quick"])


def test_reproduce_takes_budgets_per_pair_like_the_function(monkeypatch):
    """``reproduce_routerbench(budgets_per_pair=...)`` had no CLI flag: the command could not run what
    the function runs with another grid. ``--budgets-per-pair`` reaches the function (and 0 is
    refused by name, as the function refuses it)."""
    from cascade_routing.evaluation import reproduce

    seen = {}

    class _Done:
        out_dir, seconds = "out", 0.0

    def fake(**kwargs):
        seen.update(kwargs)
        return _Done()

    function = reproduce.reproduce_routerbench
    monkeypatch.setattr(reproduce, "reproduce_routerbench", fake)
    assert main(["reproduce", "routerbench", "--budgets-per-pair", "3", "--threads", "0", "--no-progress"]) == 0
    assert seen["budgets_per_pair"] == 3
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "routerbench", "--budgets-per-pair", "0"])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="budgets_per_pair must be an integer >= 1, got 0"):
        function(out_dir=None, budgets_per_pair=0, progress=False)


def test_serve_flags_default_to_the_python_apis_defaults():
    """``cascade-routing serve`` spells its defaults out (the parser does not import the server); each
    must be what ``runner.serve``, ``ControllerConfig`` and ``ServerLimits`` use when called without
    it, and the limits' help texts must state the limits' defaults."""
    import dataclasses

    from cascade_routing.cli import build_parser
    from cascade_routing.policies.controller import ControllerConfig
    from cascade_routing.serving.limits import ServerLimits
    from cascade_routing.serving.runner import DEFAULT_STORE, serve

    fn = _function_defaults(serve)
    cli = _cli_defaults(["serve", "--checkpoint", "c", "--backends", "b", "--budget", "1"])
    for key in ("strategy", "host", "port", "name", "log_level", "compute_threads", "bind_thread", "max_batch",
                "batch_window_ms", "torch_threads", "keep_alive_s", "shutdown_timeout_s", "int8", "upstream_pools",
                "workers", "header_timeout_s", "api_keys"):
        assert cli[key] == fn[key], key
    assert fn["store"] == DEFAULT_STORE and cli["store"] is None  # the CLI passes `args.store or DEFAULT_STORE`
    controller = {f.name: f.default for f in dataclasses.fields(ControllerConfig)}
    assert (cli["controller_window"], cli["controller_kp"], cli["controller_ki"], cli["controller_max_factor"]) == \
        (controller["window"], controller["k_p"], controller["k_i"], controller["max_factor"])
    limits = ServerLimits()
    assert cli["shutdown_timeout_s"] == limits.shutdown_timeout_s
    serve_parser = next(a for a in build_parser()._subparsers._group_actions[0].choices.values()
                        if a.prog.endswith(" serve"))
    helps = {a.dest: " ".join((a.help or "").split()) for a in serve_parser._actions}
    assert helps["max_body_bytes"].startswith(f"(default {limits.max_body_bytes >> 20} MiB)")
    assert helps["max_prompt_chars"].startswith(f"(default {limits.max_prompt_chars:,})")
    assert helps["max_concurrent"].startswith(f"(default {limits.max_concurrent})")
    assert helps["deadline_s"].startswith(f"(default {limits.deadline_s:g})")
    assert helps["body_timeout_s"].startswith(f"(default {limits.body_timeout_s:g})")
    assert helps["max_upstream_attempts"].startswith(f"(default {limits.max_upstream_attempts})")
