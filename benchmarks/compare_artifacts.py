"""Whether two estimator artifacts carry the same export results (exit status 1 if not).

Compared: the chosen uncertainty mode, ``var_scale``, the covariance table, the calibration report,
the uncertainty-selection scores and fold AUCs, the pools, and every fitted λ table (λ low/high,
γ, depth limit, calibration cost/quality per strategy and budget), all exactly; ``seconds`` and
``export_seconds`` are the only fields allowed to differ. The covariance table is compared on the
ran-sets both artifacts hold (a table restricted by ``covariance_coverage`` holds fewer; how many
each holds is printed).
Usage: ``python benchmarks/compare_artifacts.py A.safetensors B.safetensors``
"""

from __future__ import annotations

import sys

import torch

from cascade_routing.estimators.artifact import load_artifact


def differences(a, b) -> list[str]:
    """Names of the export results that differ between artifacts ``a`` and ``b``."""
    out = []
    for name in ("uncertainty", "covariance_kind", "calibration", "pools"):
        if getattr(a, name) != getattr(b, name):
            out.append(name)
    x, y = a.var_scale, b.var_scale
    if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
        out.append("var_scale")
    x, y = a.covariances, b.covariances
    if (x is None) != (y is None) or (x is not None and not torch.equal(x[held_ran_sets(a) & held_ran_sets(b)], y[held_ran_sets(a) & held_ran_sets(b)])):
        out.append("covariances")
    sel_a = {k: v for k, v in a.uncertainty_selection.items() if k != "seconds"}
    sel_b = {k: v for k, v in b.uncertainty_selection.items() if k != "seconds"}
    if sel_a != sel_b:
        out.append("uncertainty_selection")
    if sorted(a.fitted) != sorted(b.fitted):
        out.append("fitted strategies")
    for strategy in a.fitted:
        ta, tb = a.fitted[strategy], b.fitted.get(strategy, {})
        if sorted(ta) != sorted(tb) or any(ta[k].to_dict() != tb[k].to_dict() for k in ta):
            out.append(f"fitted[{strategy}]")
    return out


def held_ran_sets(art) -> torch.Tensor:
    """bool [2^M]: the ran-sets whose covariance the artifact holds (a restricted table is NaN elsewhere)."""
    return ~torch.isnan(art.covariances).flatten(1).any(1)


def main() -> None:
    a, b = (load_artifact(p) for p in sys.argv[1:3])
    diff = differences(a, b)
    for art, path in ((a, sys.argv[1]), (b, sys.argv[2])):
        held = "" if art.covariances is None else f", covariances for {int(held_ran_sets(art).sum())} ran-sets"
        print(f"{path}: export_seconds {art.metrics.get('export_seconds')}, uncertainty {art.uncertainty}, "
              f"selection {art.uncertainty_selection.get('seconds')} s{held}")
    print("identical export results" if not diff else f"differ in: {', '.join(diff)}")
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
