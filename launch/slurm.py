#!/usr/bin/env python3
"""Launches `rest-jax run` on an sbatch script for SLURM GPU nodes (one process per GPU or per node).

  python launch/slurm.py --gin_file F [--gin_file F2 ...] --workdir W [--gin.X=V ...] [--dry-run]
  python launch/slurm.py -h   # this launcher's own options

See rest_jax/cli/launchers.py and docs/multihost.md, "Launchers".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rest_jax.cli import launchers  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  sys.exit(launchers.main("slurm"))
