"""Evaluation of attributions at Quantus's breadth: faithfulness, robustness, complexity,
localisation and randomisation metrics, and :func:`evaluate` for a whole data split.

Every metric is a pure, batched, jittable function (keyed where random, ``chunk=`` on its
sample axis) for inputs of any rank: images ``(B, H, W, C)``, sequences ``(B, L, E)``, tabular
``(B, D)``. An attribution is shaped like ``x`` or like a leading part of it (a pixel map
``(B, H, W)``); its elements are the features. Definitions: SPEC section 11, the papers, and
Quantus 0.6 where it agrees (each function states the differences).
"""

from jaxplain.evaluation._complexity import complexity as complexity
from jaxplain.evaluation._complexity import sparseness as sparseness
from jaxplain.evaluation.faithfulness import faithfulness_correlation as faithfulness_correlation
from jaxplain.evaluation.faithfulness import infidelity as infidelity
from jaxplain.evaluation.faithfulness import irof as irof
from jaxplain.evaluation.faithfulness import linear_imputation as linear_imputation
from jaxplain.evaluation.faithfulness import pixel_flipping as pixel_flipping
from jaxplain.evaluation.faithfulness import road as road
from jaxplain.evaluation.localisation import auc as auc
from jaxplain.evaluation.localisation import pointing_game as pointing_game
from jaxplain.evaluation.localisation import relevance_mass_accuracy as relevance_mass_accuracy
from jaxplain.evaluation.localisation import relevance_rank_accuracy as relevance_rank_accuracy
from jaxplain.evaluation.randomisation import emprt as emprt
from jaxplain.evaluation.randomisation import histogram_entropy as histogram_entropy
from jaxplain.evaluation.randomisation import independent_randomization as independent_randomization
from jaxplain.evaluation.randomisation import mprt as mprt
from jaxplain.evaluation.randomisation import random_logit as random_logit
from jaxplain.evaluation.robustness import avg_sensitivity as avg_sensitivity
from jaxplain.evaluation.robustness import local_lipschitz as local_lipschitz
from jaxplain.evaluation.robustness import max_sensitivity as max_sensitivity
from jaxplain.evaluation.robustness import sensitivity as sensitivity
from jaxplain.evaluation.runner import default_metrics as default_metrics
from jaxplain.evaluation.runner import evaluate as evaluate
from jaxplain.evaluation.runner import to_json as to_json
from jaxplain.evaluation.runner import to_table as to_table
