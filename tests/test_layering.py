"""The serving stage does not depend on the training stage: importing it loads no Lightning."""

from __future__ import annotations

import subprocess
import sys


def test_serving_imports_no_lightning():
    code = (
        "import sys\n"
        "import cascade_routing.serving, cascade_routing.serving.server, cascade_routing.serving.router\n"
        "from cascade_routing.serving.checkpoint import router_parts\n"
        "import cascade_routing.estimators.artifact\n"
        "loaded = sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"serving loaded Lightning modules: {out.stdout.strip()[:200]}"
