import os
import sys

# Helpers (tests/_dist.py, tests/_models.py) import as top-level modules, in spawned workers too.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
