import sys

from cascade_routing.cli import main

sys.exit(main())
