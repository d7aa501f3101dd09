"""jaxplain: explaining neural networks in JAX/Flax.

Pure functional primitives: batched saliency and Integrated Gradients, modified-backprop
rules (WBP, LRP, DeepLIFT), interventions on the parameter pytree, and Proactive
Pseudo-Intervention (PPI) training. Every primitive takes a pure batched ``f(x) -> logits``
and never calls ``jax.jit`` itself: callers jit and vmap.

The public API is listed here explicitly, module by module. Submodules are imported lazily,
on first use of one of their names (PEP 562), so ``import jaxplain`` costs little more than
``import jax``: a script that uses only ``jaxplain.gradient`` never imports matplotlib,
optax or tensorflow-datasets.
"""

__version__ = "0.1.0"

# -- XLA:CPU: convolutions on every core (before anything can start a JAX backend) -----------
from jaxplain import _xla_cpu
_xla_cpu.apply()
from jaxplain._xla_cpu import CONV_FLAG as XLA_CPU_CONV_FLAG
from jaxplain._xla_cpu import xla_cpu_tuning as xla_cpu_tuning

import importlib as _importlib

# ``jaxplain.occlusion`` is both a submodule and a function in it; importing the submodule
# (by any module, at any time) would rebind the package attribute to the module, so the
# function is bound eagerly (occlusion.py imports only jax, numpy and jaxplain.gradients).
from jaxplain.occlusion import occlusion as occlusion

# name -> (module, attribute in it; None: the name is the module itself)
_API = {
    # -- the model interface (model) ------------------------------------------------------------
    'Model': ('jaxplain.model', 'Model'),
    'wrap': ('jaxplain.model', 'wrap'),
    'at_layer': ('jaxplain.model', 'at_layer'),
    'to_layer': ('jaxplain.model', 'to_layer'),
    'per_example': ('jaxplain.model', 'per_example'),
    # -- attribution core (gradients, integrated, cam, occlusion) --------------------------------
    'gradient': ('jaxplain.gradients', 'gradient'),
    'gradient_x_input': ('jaxplain.gradients', 'gradient_x_input'),
    'smoothgrad': ('jaxplain.gradients', 'smoothgrad'),
    'completeness_gap': ('jaxplain.integrated', 'completeness_gap'),
    'integrated_gradients': ('jaxplain.integrated', 'integrated_gradients'),
    'layer_conductance': ('jaxplain.integrated', 'layer_conductance'),
    'make_baseline': ('jaxplain.integrated', 'make_baseline'),
    'quadrature_rule': ('jaxplain.integrated', 'quadrature_rule'),
    'NotPiecewiseLinearError': ('jaxplain.integrated', 'NotPiecewiseLinearError'),
    'grad_cam': ('jaxplain.cam', 'grad_cam'),
    'guided_grad_cam': ('jaxplain.cam', 'guided_grad_cam'),
    'noise_tunnel': ('jaxplain.averaged', 'noise_tunnel'),
    'gradient_shap': ('jaxplain.averaged', 'gradient_shap'),
    'deeplift_shap': ('jaxplain.averaged', 'deeplift_shap'),
    'plot': ('jaxplain.plot', None),
    # -- rule engine (rules) ----------------------------------------------------------------------
    'wbp': ('jaxplain.rules', 'wbp'),
    'lrp': ('jaxplain.rules', 'lrp'),
    'deeplift': ('jaxplain.rules', 'deeplift'),
    'guided_backprop': ('jaxplain.rules', 'guided_backprop'),
    'deconvnet': ('jaxplain.rules', 'deconvnet'),
    'Composite': ('jaxplain.rules', 'Composite'),
    'rules': ('jaxplain.rules', None),
    'UnsupportedPrimitiveError': ('jaxplain.rules', 'UnsupportedPrimitiveError'),
    'ProbabilitiesWarning': ('jaxplain._validate', 'ProbabilitiesWarning'),
    # -- interventions ----------------------------------------------------------------------------
    'interventions': ('jaxplain.interventions', None),
    'select': ('jaxplain.interventions', 'select'),
    'set_value': ('jaxplain.interventions', 'set_value'),
    'units': ('jaxplain.interventions', 'units'),
    'sweep': ('jaxplain.interventions', 'sweep'),
    'sweep_layer': ('jaxplain.interventions', 'sweep_layer'),
    'first_order': ('jaxplain.interventions', 'first_order'),
    'causal_effect': ('jaxplain.interventions', 'causal_effect'),
    'causal_walk': ('jaxplain.interventions', 'walk'),
    # -- PPI --------------------------------------------------------------------------------------
    'PPIConfig': ('jaxplain.ppi', 'PPIConfig'),
    'box_mask': ('jaxplain.ppi', 'box_mask'),
    'make_ppi_loss': ('jaxplain.ppi', 'make_ppi_loss'),
    'make_ppi_train_step': ('jaxplain.ppi', 'make_ppi_train_step'),
    'normalize_saliency': ('jaxplain.ppi', 'normalize_saliency'),
    'one_vs_others_loss': ('jaxplain.ppi', 'one_vs_others_loss'),
    'partner_indices': ('jaxplain.ppi', 'partner_indices'),
    'ppi_objective': ('jaxplain.ppi', 'ppi_objective'),
    'soft_mask': ('jaxplain.ppi', 'soft_mask'),
    # -- metrics ----------------------------------------------------------------------------------
    'area_under_curve': ('jaxplain.metrics', 'area_under_curve'),
    'cascade_layers': ('jaxplain.metrics', 'cascade_layers'),
    'cascading_randomization': ('jaxplain.metrics', 'cascading_randomization'),
    'deletion_curve': ('jaxplain.metrics', 'deletion_curve'),
    'insertion_curve': ('jaxplain.metrics', 'insertion_curve'),
    'map_change': ('jaxplain.metrics', 'map_change'),
    'map_similarity': ('jaxplain.metrics', 'map_similarity'),
    'pixel_saliency': ('jaxplain.metrics', 'pixel_saliency'),
    'random_order_curve': ('jaxplain.metrics', 'random_order_curve'),
    'random_saliency': ('jaxplain.metrics', 'random_saliency'),
    'rank_correlation': ('jaxplain.metrics', 'rank_correlation'),
    'shift_invariance': ('jaxplain.metrics', 'shift_invariance'),
    'ssim': ('jaxplain.metrics', 'ssim'),
    'step_fractions': ('jaxplain.metrics', 'step_fractions'),
    # -- perturbation attributions and evaluation (issue 16) --------------------------------------
    'perturbation': ('jaxplain.perturbation', None),
    'feature_ablation': ('jaxplain.perturbation', 'feature_ablation'),
    'feature_permutation': ('jaxplain.perturbation', 'feature_permutation'),
    'kernel_shap': ('jaxplain.perturbation', 'kernel_shap'),
    'lime': ('jaxplain.perturbation', 'lime'),
    'rise': ('jaxplain.perturbation', 'rise'),
    'shapley_value_sampling': ('jaxplain.perturbation', 'shapley_value_sampling'),
    'evaluation': ('jaxplain.evaluation', None),
    'evaluate': ('jaxplain.evaluation', 'evaluate'),
    # -- submodules -------------------------------------------------------------------------------
    'models': ('jaxplain.models', None),
    'data': ('jaxplain.data', None),
    'train': ('jaxplain.train', None),
}

__all__ = sorted(list(_API) + ["XLA_CPU_CONV_FLAG", "xla_cpu_tuning", "occlusion"])


def __getattr__(name: str):
  try:
    module, attr = _API[name]
  except KeyError:
    raise AttributeError(f"module 'jaxplain' has no attribute {name!r}") from None
  value = _importlib.import_module(module)
  if attr is not None:
    value = getattr(value, attr)
  globals()[name] = value  # later lookups do not come back here
  return value


def __dir__():
  return sorted(set(globals()) | set(_API))
