"""shardsave: save PEFT adapters out of distributed training, exactly as PEFT writes them.

Public API::

    shardsave.save_pretrained(model, save_directory, ...)   # every rank calls; the main process writes
    shardsave.gather_state_dict(model, keep=None)           # full tensors of chosen parameters on one rank
"""

from .ranks import MissingRanksError, RemoteError, SaveError
from .save import gather_state_dict, save_pretrained

__all__ = ["save_pretrained", "gather_state_dict", "SaveError", "MissingRanksError", "RemoteError"]
__version__ = "0.1.0"
