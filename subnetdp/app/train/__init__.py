"""`subnetdp train` and what it writes: the run's processes (context.py), what each process trains
(workers.py), the step loop (loop.py), evaluation, checkpoints and resharding, the run folder, and
`subnetdp export`."""
