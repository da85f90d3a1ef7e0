"""dpg: Dataset Policy Gradient.

The engine (`example_metagrads`) scores training examples by the exact derivative of a
target metric after fine-tuning on them; the rest of the package trains a generator on
those scores.
"""

from dpg.errors import DpgError
from dpg.metagrad import Examples, MetagradResult, Recipe, example_metagrads, fine_tune, make_examples

__all__ = ["DpgError", "Examples", "MetagradResult", "Recipe", "example_metagrads", "make_examples", "fine_tune"]
__version__ = "0.1.0"
