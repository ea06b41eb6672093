"""flexc kernels: custom ops (attention, multi-LoRA) with torch references and Triton kernels.

Importing this package registers the ``torch.ops.flexc.*`` ops.
"""
from flexc.kernels import attention  # noqa: F401  (registers flexc::attention)
from flexc.kernels import lora  # noqa: F401  (registers flexc::lora)
