"""The exact data-attribution engine. It knows nothing of RL."""

from dpg.metagrad.engine import Examples, MetagradResult, Recipe, example_metagrads, fine_tune, make_examples
from dpg.metagrad.optim import SGD, AdamW

__all__ = ["Examples", "MetagradResult", "Recipe", "example_metagrads", "make_examples", "fine_tune", "SGD", "AdamW"]
