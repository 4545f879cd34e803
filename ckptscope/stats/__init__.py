"""Statistics: the per-tensor record and the module tree need no torch; the engine does.

Import the engine from ``ckptscope.stats.engine`` so that listing never pays for ``import torch``.
"""

from .model import HIST_BINS, TensorStats
from .tree import TreeNode, build_tree

__all__ = ["HIST_BINS", "TensorStats", "TreeNode", "build_tree"]
