"""`subnetdp bench`: memory, communication and step time of DDP, FSDP2 and SDP, each strategy in its
own processes (runner.py), and the report of a bench folder (report.py)."""
