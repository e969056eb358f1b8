"""torch.library custom ops ``scalesearch::*``: a PyTorch reference (any device), a Triton launch (CUDA) and
a fake (meta) implementation for each. Importing this package registers them."""

import scalesearch_compile.ops.attention  # noqa: F401
import scalesearch_compile.ops.grouped  # noqa: F401
import scalesearch_compile.ops.linear  # noqa: F401
import scalesearch_compile.ops.linear_qat  # noqa: F401
