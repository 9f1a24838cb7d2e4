"""optserve for PyTorch: `RemoteOptimizer`, a `torch.optim.Optimizer` whose update runs on a server.

Importing this package imports torch (`optserve[torch]`); `optserve.client` never does.
README.md, "PyTorch", has the one-line change and the pitfalls.
"""

from optserve.torch.optimizer import RemoteOptimizer

__all__ = ["RemoteOptimizer"]
