"""Interventions on parameters (seed 001, SPEC section 4): selections, pure edits, vectorised
sweeps with prefix reuse, first-order estimates, and the causal-mechanism walk (Algorithm 1).
"""

from jaxplain.interventions._select import Selection as Selection
from jaxplain.interventions._select import select as select
from jaxplain.interventions._select import tree_paths as tree_paths
from jaxplain.interventions._edit import Units as Units
from jaxplain.interventions._edit import add_noise as add_noise
from jaxplain.interventions._edit import keep_only as keep_only
from jaxplain.interventions._edit import layer_paths as layer_paths
from jaxplain.interventions._edit import scale as scale
from jaxplain.interventions._edit import set_value as set_value
from jaxplain.interventions._edit import units as units
from jaxplain.interventions._sweep import agreement as agreement
from jaxplain.interventions._sweep import first_order as first_order
from jaxplain.interventions._sweep import shard_masks as shard_masks
from jaxplain.interventions._sweep import sweep as sweep
from jaxplain.interventions._sweep import sweep_layer as sweep_layer
from jaxplain.interventions._causal import LayerEffects as LayerEffects
from jaxplain.interventions._causal import WalkResult as WalkResult
from jaxplain.interventions._causal import causal_effect as causal_effect
from jaxplain.interventions._causal import correct as correct
from jaxplain.interventions._causal import effects as effects
from jaxplain.interventions._causal import mediator_map as mediator_map
from jaxplain.interventions._causal import significance as significance
from jaxplain.interventions._causal import walk as walk
from jaxplain.interventions._causal import walk_step as walk_step
