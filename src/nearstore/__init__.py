"""nearstore: near-storage processing for deep learning.

Layers (dependencies point down; checked by ``lint-imports``, see pyproject.toml): ``cli`` -> ``bench`` | ``jobs`` ->
``loader`` | ``train`` -> ``plan`` | ``design`` -> ``node`` -> ``store`` -> ``ops`` | ``model`` -> ``nets`` ->
``core``.
"""

from nearstore.core.errors import *  # noqa: F401,F403
from nearstore.loader import Batch, Loader
from nearstore.ops import Pipeline, standard_train
from nearstore.store import Store, SynthSpec, ingest, synth_folder

__version__ = "0.1.0"

__all__ = ["Batch", "Loader", "Pipeline", "standard_train", "Store", "SynthSpec", "ingest", "synth_folder"]
