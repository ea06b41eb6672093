"""flexc kernels: custom ops (attention, multi-LoRA) with torch references.

Importing this package registers the ``torch.ops.flexc.*`` ops.
"""
from flexc.kernels import attention  # noqa: F401  (registers flexc::attention)
