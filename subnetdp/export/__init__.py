"""Every model one SDP run yields, as plain models: each worker's subnetwork as a standalone
model of its own class (standalone.py, families.py), saved as a folder that loads without subnetdp
(folder.py), and the ensemble of the N subnetworks (ensemble.py). Imports the engine and the
models, never the application."""

from .ensemble import Ensemble, load_ensemble, member_name, save_ensemble, write_ensemble_index
from .families import FAMILIES, Family, family_of
from .folder import load_subnetwork, model_card, save_subnetwork
from .standalone import BlockEntry, Standalone, standalone_subnetwork

__all__ = ["FAMILIES", "BlockEntry", "Ensemble", "Family", "Standalone", "family_of", "load_ensemble",
           "load_subnetwork", "member_name", "model_card", "save_ensemble", "save_subnetwork", "standalone_subnetwork",
           "write_ensemble_index"]
