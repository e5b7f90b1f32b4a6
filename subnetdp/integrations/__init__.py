"""Integrations with other libraries' training loops. Each module imports its library: import it
only where that library is installed (``pip install "subnetdp[hf]"`` for ``hf_trainer``)."""
