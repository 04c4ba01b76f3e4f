"""More than one device: data-parallel sweeps over launched processes (processes.py) and targets whose
weights are offloaded to CPU memory or disk (offload.py)."""
