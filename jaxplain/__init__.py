"""jaxplain: explaining neural networks in JAX/Flax.

Pure functional primitives: batched saliency and Integrated Gradients, modified-backprop
rules (WBP, LRP, DeepLIFT), interventions on the parameter pytree, and Proactive
Pseudo-Intervention (PPI) training. Every primitive takes a pure batched ``f(x) -> logits``
and never calls ``jax.jit`` itself: callers jit and vmap.

The public API is listed here explicitly, module by module.
"""

__version__ = "0.1.0"

# -- attribution core (gradients, integrated, cam, occlusion) --------------------------------

# -- rule engine (rules) ----------------------------------------------------------------------

# -- interventions ----------------------------------------------------------------------------

# -- PPI --------------------------------------------------------------------------------------

# -- metrics ----------------------------------------------------------------------------------

# -- submodules -------------------------------------------------------------------------------
from jaxplain import models as models
