"""The toy world: synthetic pictures and captions (`world.py`) and the small CLIP teacher trained on them
(`teacher.py`), so the whole method runs on a laptop CPU with no model hub."""
