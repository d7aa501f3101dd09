"""jaxplain: explaining neural networks in JAX/Flax.

Pure functional primitives: batched saliency and Integrated Gradients, modified-backprop
rules (WBP, LRP, DeepLIFT), interventions on the parameter pytree, and Proactive
Pseudo-Intervention (PPI) training. Every primitive takes a pure batched ``f(x) -> logits``
and never calls ``jax.jit`` itself: callers jit and vmap.

The public API is listed here explicitly, module by module.
"""

__version__ = "0.1.0"

# -- XLA:CPU: convolutions on every core (before anything can start a JAX backend) -----------
from jaxplain import _xla_cpu
_xla_cpu.apply()
from jaxplain._xla_cpu import CONV_FLAG as XLA_CPU_CONV_FLAG
from jaxplain._xla_cpu import xla_cpu_tuning as xla_cpu_tuning

# -- the model interface (model) ------------------------------------------------------------
from jaxplain.model import Model as Model
from jaxplain.model import wrap as wrap

# -- attribution core (gradients, integrated, cam, occlusion) --------------------------------
from jaxplain.gradients import gradient as gradient
from jaxplain.gradients import gradient_x_input as gradient_x_input
from jaxplain.gradients import smoothgrad as smoothgrad
from jaxplain.integrated import completeness_gap as completeness_gap
from jaxplain.integrated import integrated_gradients as integrated_gradients
from jaxplain.integrated import make_baseline as make_baseline
from jaxplain.integrated import quadrature_rule as quadrature_rule
from jaxplain.integrated import NotPiecewiseLinearError as NotPiecewiseLinearError
from jaxplain.cam import grad_cam as grad_cam
from jaxplain.occlusion import occlusion as occlusion
from jaxplain import plot as plot

# -- rule engine (rules) ----------------------------------------------------------------------
from jaxplain.rules import wbp as wbp
from jaxplain.rules import lrp as lrp
from jaxplain.rules import deeplift as deeplift
from jaxplain.rules import guided_backprop as guided_backprop
from jaxplain.rules import deconvnet as deconvnet
from jaxplain.rules import Composite as Composite
from jaxplain import rules as rules
from jaxplain.rules import UnsupportedPrimitiveError as UnsupportedPrimitiveError

# -- interventions ----------------------------------------------------------------------------
from jaxplain import interventions as interventions
from jaxplain.interventions import select as select
from jaxplain.interventions import set_value as set_value
from jaxplain.interventions import units as units
from jaxplain.interventions import sweep as sweep
from jaxplain.interventions import sweep_layer as sweep_layer
from jaxplain.interventions import first_order as first_order
from jaxplain.interventions import causal_effect as causal_effect
from jaxplain.interventions import walk as causal_walk

# -- PPI --------------------------------------------------------------------------------------
from jaxplain.ppi import PPIConfig as PPIConfig
from jaxplain.ppi import box_mask as box_mask
from jaxplain.ppi import make_ppi_loss as make_ppi_loss
from jaxplain.ppi import make_ppi_train_step as make_ppi_train_step
from jaxplain.ppi import normalize_saliency as normalize_saliency
from jaxplain.ppi import one_vs_others_loss as one_vs_others_loss
from jaxplain.ppi import partner_indices as partner_indices
from jaxplain.ppi import ppi_objective as ppi_objective
from jaxplain.ppi import soft_mask as soft_mask

# -- metrics ----------------------------------------------------------------------------------
from jaxplain.metrics import area_under_curve as area_under_curve
from jaxplain.metrics import cascade_layers as cascade_layers
from jaxplain.metrics import cascading_randomization as cascading_randomization
from jaxplain.metrics import deletion_curve as deletion_curve
from jaxplain.metrics import insertion_curve as insertion_curve
from jaxplain.metrics import map_change as map_change
from jaxplain.metrics import map_similarity as map_similarity
from jaxplain.metrics import pixel_saliency as pixel_saliency
from jaxplain.metrics import random_order_curve as random_order_curve
from jaxplain.metrics import random_saliency as random_saliency
from jaxplain.metrics import rank_correlation as rank_correlation
from jaxplain.metrics import shift_invariance as shift_invariance
from jaxplain.metrics import ssim as ssim
from jaxplain.metrics import step_fractions as step_fractions

# -- perturbation attributions and evaluation (issue 16) --------------------------------------
from jaxplain import perturbation as perturbation
from jaxplain.perturbation import feature_ablation as feature_ablation
from jaxplain.perturbation import kernel_shap as kernel_shap
from jaxplain.perturbation import lime as lime
from jaxplain.perturbation import rise as rise
from jaxplain.perturbation import shapley_value_sampling as shapley_value_sampling
from jaxplain import evaluation as evaluation
from jaxplain.evaluation import evaluate as evaluate

# -- submodules -------------------------------------------------------------------------------
from jaxplain import models as models
from jaxplain import data as data
from jaxplain import train as train
