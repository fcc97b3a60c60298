"""Moved to common/world/shapes.py. This alias keeps `from common import shapes` (common/utils.py) working; it goes
when utils.py imports `from common.world import shapes`."""
import sys

from common.world import shapes

sys.modules[__name__] = shapes
