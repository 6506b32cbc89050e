"""The training code: train.py's flags and settings, the stages it runs, their setup and teacher caches, the
optimizer's groups and the curves. It imports the library (miniproclip/*), never the toy world; the library never
imports it (tests/test_layers.py)."""
