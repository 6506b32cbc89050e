"""The project's own error types: what the entry points (train.py, eval.py, the CLIs) print as one line.

Every error a user can fix (a wrong model folder, a malformed data file, a damaged cache or checkpoint, a bad flag)
is one of USER_ERRORS, and its message names the file and what to do; the entry points print `error: <message>`
and exit with status 1 (eval.py: 2). Any other exception is a bug and keeps its traceback. The library's types live beside the
code that raises them (so a model file can be copied out with its error type); this module names them all, and
holds the types of the layers above the model files (training, evaluation, the toy world).
"""

from .checkpoint import CheckpointError
from .data import DataError
from .embed import CacheError
from .image import ImageReadError
from .weights import ModelFolderError


class TrainingError(Exception):
    """A bad flag, or a fatal condition met mid-run (a full disk, too many non-finite steps); say what to do next."""


class BenchmarkError(ValueError):
    """A dataset or model that cannot be evaluated as given (evaluation.py, eval.py); the message names the file and
    what to do."""


class ToyWorldError(Exception):
    """The toy world cannot be built as asked (another world in the folder, SmolLM2 missing, its stage 0 failed)."""


USER_ERRORS = (TrainingError, ToyWorldError, ModelFolderError, DataError, CheckpointError, CacheError,
               ImageReadError, BenchmarkError)
