"""The study: `subnetdp sweep` (a grid of train cells over seeds: grid.py, cells.py, results.py,
sweep.py) and `subnetdp align` (gradient alignment with DDP along a run)."""
