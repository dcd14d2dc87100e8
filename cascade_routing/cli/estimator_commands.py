"""`cascade-routing` subcommands of the estimator stage: ``evaluate``, ``train`` (train.py's
LightningCLI), ``train-eval``, ``export``, ``inspect-artifact``, ``distill-encoder``."""

from __future__ import annotations

import argparse
import json
import os

from cascade_routing.cli.arguments import positive_int
from cascade_routing.evaluation import protocol
from cascade_routing.evaluation.protocol import ESTIMATORS


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this stage's subcommands (each sets `func`); defaults are the wrapped functions' (the
    shared constants of :mod:`cascade_routing.evaluation.protocol`)."""
    p = subparsers.add_parser(
        "evaluate",
        help="AUC of routing / cascades / cascade routing with a trained estimator vs the paper-style baseline",
        description="λ fitted on the calibration split, AUC on the test split (the artifact's own split).",
    )
    p.add_argument("--checkpoint", required=True,
                   help="estimator artifact written by train.py: a .safetensors file, or a folder written by "
                        "EstimatorArtifact.save_pretrained (estimator.safetensors inside)")
    p.add_argument("--dataset", default=None, help="dataset name or folder (default: the one it was trained on)")
    p.add_argument("--out", default="eval", help="output folder for results.csv, table.md, curves.png")
    p.add_argument("--budgets-per-pair", type=positive_int, default=protocol.BUDGETS_PER_PAIR,
                   help="budgets between consecutive non-dominated models (default: the shared protocol)")
    p.add_argument("--resamples", type=positive_int, default=protocol.NUM_RESAMPLES,
                   help="bootstrap resamples for the 95%% CI (default: the shared protocol)")
    p.add_argument("--strategies", default=None, help="comma-separated subset of strategies")
    p.add_argument("--no-baseline", action="store_true", help="skip the paper-style baseline estimator")
    p.add_argument("--no-wandb", action="store_true", help="do not log to wandb (offline by default)")
    p.add_argument("--uncertainty", choices=("variance", "covariance", "none"), default=None,
                   help="override the artifact's uncertainty method for the learned estimator")
    p.set_defaults(func=_evaluate)

    # listed for the command's help only: cascade_routing.cli.main hands "train ..." to train_passthrough
    # before argparse sees it, so LightningCLI parses every option (its --help included)
    subparsers.add_parser(
        "train", add_help=False,
        help="train.py from the installed package: fit / validate / test with a config (LightningCLI)",
    )

    t = subparsers.add_parser(
        "train-eval",
        help="train estimators with a train.py config, then evaluate the artifact it writes",
        description="Runs `python train.py fit --config CONFIG ...` in-process, then `evaluate` on its artifact. "
                    f"CONFIG is a shipped experiment ({', '.join(_experiments())}), a group or overlay "
                    "(data/<dataset>, model/frozen, trainer/cpu, logger/wandb_csv, finetune_gpu) or a YAML path; "
                    "repeat --config to compose (later keys win).",
    )
    t.add_argument("--config", action="append", default=None,
                   help="config name or YAML path; repeatable (default: routerbench)")
    t.add_argument("--out", default=None, help="evaluation output folder (default: eval/<config name>)")
    t.add_argument("--budgets-per-pair", type=positive_int, default=protocol.BUDGETS_PER_PAIR)
    t.add_argument("--resamples", type=positive_int, default=protocol.NUM_RESAMPLES)
    t.add_argument("--no-wandb", action="store_true",
                   help="no wandb run at all, for training or evaluation (the CSV logs stay)")
    t.add_argument("--no-baseline", action="store_true", help="skip the paper-style baseline estimator")
    t.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="extra LightningCLI arguments after the options, e.g. -- --trainer.max_epochs=5")
    t.set_defaults(func=_train_eval)

    e = subparsers.add_parser(
        "export",
        help="export a training checkpoint (best.ckpt) to an estimator artifact, without retraining",
        description="Calibration, uncertainty selection and λ tables on the checkpoint's own calibration split "
                    "(the step ExportArtifact runs at the end of fit).",
    )
    e.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train.py")
    e.add_argument("--out", default=None, help="artifact path (default: artifacts/<name>.safetensors for "
                                                "runs/<name>/checkpoints/*.ckpt, as fit writes; else artifacts/<dataset>.safetensors)")
    e.add_argument("--budgets-per-pair", type=positive_int, default=protocol.EXPORT_BUDGETS_PER_PAIR,
                   help="budgets per pair of the fitted λ tables (default: %(default)s)")
    e.add_argument("--no-lambdas", action="store_true", help="skip fitting the λ tables")
    e.add_argument("--no-select", action="store_true", help="choose the uncertainty mode by val NLL only")
    e.set_defaults(func=_export)

    i = subparsers.add_parser("inspect-artifact", help="print an estimator artifact's models, prices, budgets")
    i.add_argument("checkpoint")
    i.set_defaults(func=_inspect)

    _register_distill(subparsers)


def _strategies(arg: str | None) -> tuple[str, ...]:
    """``--strategies a,b``: the names in order (none given: every strategy). Not checked here:
    :func:`~cascade_routing.training.heldout.evaluate` checks them, so the CLI and the API refuse a
    bad name with one message."""
    from cascade_routing.policies.registry import STRATEGIES

    if not arg:
        return STRATEGIES
    return tuple(s.strip() for s in arg.split(",") if s.strip())


def _evaluate(args: argparse.Namespace) -> int:
    from cascade_routing.training.heldout import evaluate
    from cascade_routing.estimators.runtime import configure_threads

    configure_threads()
    evaluate(
        args.checkpoint,
        dataset=args.dataset,
        out_dir=args.out,
        strategies=_strategies(args.strategies),
        budgets_per_pair=args.budgets_per_pair,
        num_resamples=args.resamples,
        estimators=("learned",) if args.no_baseline else ESTIMATORS,
        log_wandb=not args.no_wandb,
        uncertainty=args.uncertainty,
    )
    return 0


def train_eval(config: str | list[str] = "routerbench", overrides: list[str] | None = None, out: str | None = None,
               budgets_per_pair: int = protocol.BUDGETS_PER_PAIR, num_resamples: int = protocol.NUM_RESAMPLES,
               log_wandb: bool = True, estimators: tuple[str, ...] = ESTIMATORS):
    """Train with ``config`` (one or more config names / paths, composed in order; the project's
    LightningCLI, in-process) and evaluate the artifact it exports with the shared protocol
    (``budgets_per_pair``, ``num_resamples``, ``estimators``: as in
    :func:`~cascade_routing.training.heldout.evaluate`, and checked as it checks them, before training).

    One experiment is one wandb run: the training run stays open and the evaluation logs into it.
    ``log_wandb=False``: no wandb run at all (the config's wandb loggers are dropped; CSV logs stay).
    """
    import time

    from cascade_routing.configs import experiment_name
    from cascade_routing.training.heldout import evaluate
    from cascade_routing.training.export import ExportArtifact
    from cascade_routing.cli.data_commands import print_input_warnings
    from cascade_routing.training.lightning_cli import lightning_cli
    from cascade_routing.training.export import check_output_folder

    protocol.check_settings(budgets_per_pair, num_resamples)  # before training, not after it
    protocol.check_names(estimators, ESTIMATORS, "estimators")
    configs = [config] if isinstance(config, str) else list(config)
    args = ["fit"] + [a for c in configs for a in ("--config", c)] + list(overrides or [])
    name = experiment_name(args) or "experiment"
    out = out or os.path.join("eval", name)
    check_output_folder(out, "--out")  # before training, not after it
    t0 = time.perf_counter()
    cli = lightning_cli(args, prog="cascade-routing train", log_wandb=log_wandb)  # tip: `cascade-routing train fit --help`
    exports = [c for c in cli.trainer.callbacks if isinstance(c, ExportArtifact)]
    if not exports:
        raise RuntimeError(f"config {configs} has no ExportArtifact callback, so training wrote no artifact")
    if exports[0].artifact_path is None:
        raise RuntimeError(f"training wrote no artifact (export skipped: {exports[0].skipped}); nothing to evaluate")
    train_s = time.perf_counter() - t0
    result = evaluate(str(exports[0].artifact_path), out_dir=out, budgets_per_pair=budgets_per_pair,
                      num_resamples=num_resamples, cache_dir=cli.datamodule.cache_dir, log_wandb=log_wandb, estimators=estimators)
    print(f"train {train_s:.0f} s, evaluate {result.seconds:.0f} s, total {time.perf_counter() - t0:.0f} s")
    print_input_warnings(cli.datamodule.input_messages, f"dataset {cli.datamodule.dataset_name!r}")  # again, last
    return result


def _experiments() -> list[str]:
    """The shipped experiment configs: top-level configs that name their run folder (not overlays)."""
    from cascade_routing.configs import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if "default_root_dir" in p.read_text())


def train_passthrough(args: argparse.Namespace) -> int:
    """``cascade-routing train ARGS``: the project's LightningCLI on ARGS (what ``python train.py ARGS`` runs)."""
    from cascade_routing.training.lightning_cli import lightning_cli

    lightning_cli(args.cli_args or ["--help"], prog="cascade-routing train")
    return 0


def _train_eval(args: argparse.Namespace) -> int:
    overrides = [o for o in (args.overrides or []) if o != "--"]
    train_eval(args.config or ["routerbench"], overrides, args.out, args.budgets_per_pair, args.resamples,
               not args.no_wandb, estimators=("learned",) if args.no_baseline else ESTIMATORS)
    return 0


def _export(args: argparse.Namespace) -> int:
    from cascade_routing.training.export import export_checkpoint
    from cascade_routing.estimators.runtime import configure_threads

    configure_threads()
    export_checkpoint(args.ckpt, args.out, args.budgets_per_pair, not args.no_lambdas, not args.no_select)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from cascade_routing.estimators.artifact import load_artifact

    art = load_artifact(args.checkpoint)
    print(json.dumps({
        "models": art.models,
        "prices": art.prices,
        "uncertainty": art.uncertainty,
        "uncertainty_selection": art.uncertainty_selection,
        "calibration": art.calibration,
        "fitted_budgets": {s: sorted(t) for s, t in art.fitted.items()},
        "data_config": art.data_config,
        "encoder": art.encoder,
    }, indent=2))
    return 0


def _register_distill(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``distill-encoder``: its defaults are those of :func:`~cascade_routing.training.distill.distill_encoder`,
    :func:`~cascade_routing.training.distill.distill_for_dataset` and
    :class:`~cascade_routing.training.distill.StudentConfig`, read from them."""
    import dataclasses
    import inspect

    from cascade_routing.cli.arguments import non_negative_int
    from cascade_routing.estimators.encoding import TRUNCATIONS
    from cascade_routing.training.distill import StudentConfig, distill_encoder, distill_for_dataset

    default = {name: p.default for fn in (distill_encoder, distill_for_dataset)
               for name, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}
    default.update((f.name, f.default) for f in dataclasses.fields(StudentConfig))
    d = subparsers.add_parser(
        "distill-encoder",
        help="distil a small student encoder from the frozen MiniLM teacher on a dataset's train split",
        description="Trains a student BertModel (teacher's tokenizer) to match the teacher's mean-pooled "
                    "embeddings of the train-split queries (+ train answers) and saves a Hugging Face folder "
                    "usable as data.encoder_path. See cascade_routing/training/distill.py.",
    )
    d.add_argument("--dataset", required=True, help="dataset name or folder")
    d.add_argument("--out", required=True, help="output folder (Hugging Face model + tokenizer)")
    d.add_argument("--teacher", default=None, help="teacher encoder folder (default: all-MiniLM-L6-v2)")
    d.add_argument("--layers", type=positive_int, default=default["layers"], help="default: %(default)s")
    d.add_argument("--hidden", type=positive_int, default=default["hidden"], help="default: %(default)s")
    d.add_argument("--heads", type=positive_int, default=default["heads"], help="default: %(default)s")
    d.add_argument("--intermediate", type=positive_int, default=default["intermediate"],
                   help="feed-forward width (default 4 x hidden)")
    d.add_argument("--epochs", type=positive_int, default=default["epochs"], help="default: %(default)s")
    d.add_argument("--batch-size", type=positive_int, default=default["batch_size"], help="default: %(default)s")
    d.add_argument("--lr", type=float, default=default["lr"], help="default: %(default)s")
    d.add_argument("--answers", type=non_negative_int, default=default["answers"],
                   help="train-split answers added to the train queries (default: %(default)s)")
    d.add_argument("--max-length", type=positive_int, default=default["max_length"],
                   help="tokens kept per text, as data.max_length (default: %(default)s)")
    d.add_argument("--truncation", choices=TRUNCATIONS, default=default["truncation"],
                   help="which tokens of a longer text are kept: right (the start), left (the end; "
                        "data.truncation's default), head_tail (default: %(default)s)")
    d.add_argument("--split", type=_split_fractions, default=None,
                   help="split fractions as JSON, as data.split (default: the data module's, "
                        '{"train": 0.55, "val": 0.1, "calibration": 0.15, "test": 0.2})')
    d.add_argument("--split-seed", type=int, default=default["split_seed"], help="default: %(default)s")
    d.add_argument("--seed", type=int, default=default["seed"], help="default: %(default)s")
    d.set_defaults(func=_distill)


def _split_fractions(text: str) -> dict:
    """``--split``: a JSON object of split fractions."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object such as {{"train": 0.8, "test": 0.2}}, got {text!r}')
    return value


def _distill(args: argparse.Namespace) -> int:
    from cascade_routing.training.distill import StudentConfig, distill_for_dataset
    from cascade_routing.estimators.runtime import configure_threads

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_threads()  # 1 thread unless CASCADE_ROUTING_NUM_THREADS (see runtime.py: 2 spin on a busy machine)
    res = distill_for_dataset(
        args.dataset, args.out, args.teacher,
        StudentConfig(args.layers, args.hidden, args.heads, args.intermediate),
        split=args.split, split_seed=args.split_seed, answers=args.answers,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length, seed=args.seed,
        truncation=args.truncation,
    )
    print(f"student written to {res.path}: held-out relative MSE {res.heldout_loss_initial:.3f} -> "
          f"{res.heldout_loss_final:.3f} ({res.texts_train} train texts, {res.seconds:.0f} s)")
    return 0
