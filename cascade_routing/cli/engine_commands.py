"""`cascade-routing` subcommands of the engine stage.

- ``cascade-routing reproduce routerbench [--dataset D] [--pool NAME=m1,m2 ...] [--out DIR] [--quick]``:
  the paper's RouterBench experiment (on any dataset), wrapping
  :func:`cascade_routing.evaluation.reproduce.reproduce_routerbench`.
"""

from __future__ import annotations

import argparse

from cascade_routing.cli.arguments import non_negative_int, positive_int


def limit_threads(threads: int) -> None:
    """Use at most ``threads`` threads in torch's intra-op pool and in numpy's BLAS (process-wide).

    The BLAS limit matters on busy cores: numpy's spinning OpenBLAS threads made the bootstrap
    bands' [28 × 2992] @ [2992 × 200] product 100 ms instead of 1 ms at load ~6."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads, user_api="blas")


def _reproduce(args: argparse.Namespace) -> int:
    from cascade_routing.evaluation.reproduce import parse_pools, reproduce_routerbench

    pools = parse_pools(args.pool) if args.pool else None
    if args.threads > 0:
        limit_threads(args.threads)
    dataset = None
    if args.dataset != "routerbench-subset":
        from cascade_routing.data import load_dataset

        dataset = load_dataset(args.dataset)
    result = reproduce_routerbench(
        out_dir=args.out, dataset=dataset, pools=pools, seed=args.seed, quick=args.quick,
        num_samples=args.num_samples, budgets_per_pair=args.budgets_per_pair, num_resamples=args.resamples,
        progress=not args.no_progress, device=args.device,
    )
    print(f"wrote {result.out_dir}/results.csv, table.md, curves.png (+ .svg) in {result.seconds:.1f} s")
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this stage's subcommands (each sets `func`); defaults are reproduce_routerbench's
    (:mod:`cascade_routing.evaluation.protocol`'s paper constants)."""
    from cascade_routing.evaluation import protocol

    rep = subparsers.add_parser("reproduce", help="reproduce an experiment of the paper")
    rep_sub = rep.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    rb = rep_sub.add_parser(
        "routerbench",
        help="Table 1: routing / cascades / cascade routing with synthetic estimators on RouterBench",
    )
    rb.add_argument("--out", default="reproduce_routerbench", help="output folder (CSV, markdown table, PNG)")
    rb.add_argument("--dataset", default="routerbench-subset", help="dataset name or folder")
    rb.add_argument("--pool", action="append", default=[], metavar="NAME=MODEL,MODEL,...",
                    help="a pool of models (repeatable); default: the paper's pools on RouterBench, else the "
                         "dataset's non-dominated models and all models")
    rb.add_argument("--seed", type=int, default=0)
    rb.add_argument("--num-samples", type=positive_int, default=128, help="quasi-random draws for E[max]")
    rb.add_argument("--budgets-per-pair", type=positive_int, default=protocol.PAPER_BUDGETS_PER_PAIR,
                    help="budgets between consecutive non-dominated models (default: %(default)s, the paper's)")
    rb.add_argument("--resamples", type=positive_int, default=protocol.PAPER_NUM_RESAMPLES,
                    help="bootstrap resamples for the CI (default: %(default)s)")
    rb.add_argument("--quick", action="store_true", help="first pool, low noise, 4 budgets per pair, at most 100 bootstrap resamples")
    rb.add_argument("--no-progress", action="store_true", help="no progress bar")
    rb.add_argument("--device", default="cpu", help="where the estimators' tables and the engine run (cpu, cuda)")
    rb.add_argument("--threads", type=non_negative_int, default=1,
                    help="torch intra-op threads (default 1: on a shared or busy CPU, multi-threaded small "
                         "kernels slow down by up to 10x; 0 = torch's default)")
    rb.set_defaults(func=_reproduce)
