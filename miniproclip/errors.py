"""The project's own error types: what the entry points (train.py, eval.py, the CLIs) print as one line.

Every error a user can fix (a wrong model folder, a malformed data file, a damaged cache or checkpoint, a bad
setting) is a `UserError`, and its message names the file or parameter and what to do; every entry point catches
this one base, prints `error: <message>` and exits with status 1 (`exit_with`). Any other exception is a bug and
keeps its traceback. This module imports nothing, so a model file that raises one of these can be copied out with
it; the library's own types live beside the code that raises them (weights.ModelFolderError, data.DataError,
checkpoint.CheckpointError, embed.CacheError, image.ImageReadError), the layers above the model files' here.
"""

import sys


class UserError(Exception):
    """Something the user can fix; the message names the file or the parameter and what to do."""


class SettingsError(UserError, ValueError):
    """A setting whose value cannot work (an unknown preset, a length that leaves no room for the caption)."""


class TrainingError(UserError):
    """A bad flag, or a fatal condition met mid-run (a full disk, too many non-finite steps); say what to do next."""


class BenchmarkError(UserError, ValueError):
    """A dataset or model that cannot be evaluated as given (evaluation.py, eval.py); the message names the file and
    what to do."""


class ToyWorldError(UserError):
    """The toy world cannot be built as asked (another world in the folder, SmolLM2 missing, its stage 0 failed)."""


def exit_with(error: UserError):
    """The entry points' one way out on a user error: `error: <message>` on stderr, exit status 1."""
    sys.exit(f"error: {error}")
