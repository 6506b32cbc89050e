"""The one exception type that ends a training run with a one-line message (`error: ...`) instead of a traceback.

train.py's `main()` catches it (and the library's user-error types: ModelFolderError, DataError,
CheckpointError) and prints `error: <message>`, exit status 1. Raise it for bad flags and for fatal conditions
met mid-run (a full disk, too many non-finite steps); say what to do next in the message.
"""


class TrainingError(Exception):
    """A user error or a fatal condition of a run; str(error) is the one line shown to the user."""
