#!/usr/bin/env python3
"""Launches `rest-jax run` on a GKE JobSet through xpk (TPU slices or GPU nodes).

  python launch/xpk.py --gin_file F [--gin_file F2 ...] --workdir W [--gin.X=V ...] [--dry-run]
  python launch/xpk.py -h   # this launcher's own options

See rest_jax/cli/launchers.py and docs/multihost.md, "Launchers".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rest_jax.cli import launchers  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  sys.exit(launchers.main("xpk"))
