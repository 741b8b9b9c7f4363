"""Figure builders, by subject. Each returns a ``matplotlib.figure.Figure`` built without pyplot's global state
(display it in a notebook by leaving it as a cell's last value, or ``fig.savefig(path)``); none calls
``plt.show()``.

>>> import pandas as pd
>>> table = pd.DataFrame({"order": [0, 1], "module": ["a", "b"], "rel_rms": [1e-4, 3e-2], "floor": [1e-3] * 2,
...                       "status": ["ok", "ok"], "tensor": ["output"] * 2, "call": [0, 0]})
>>> type(error_by_module(table)).__name__
'Figure'
"""

from .errors import error_by_module, layer_error_growth, local_vs_propagated_waterfall, token_heatmap
from .evaluation import bos_effect_by_context_length, loss_difference_by_position, perplexity_with_errorbars
from .generation import divergence_histogram, layer_error_profile, lockstep_margins
from .precision import bisection_curve, class_sweep
from .verdicts import execution_floors, verdicts_by_module
from .prefill import (prefill_error_vs_chunk_size, prefill_error_vs_length, prefill_error_vs_position,
                      prefill_state_at_boundaries)

__all__ = [
    "bisection_curve", "bos_effect_by_context_length", "class_sweep", "divergence_histogram", "error_by_module", "execution_floors",
    "layer_error_growth", "layer_error_profile", "local_vs_propagated_waterfall", "lockstep_margins",
    "loss_difference_by_position", "perplexity_with_errorbars", "prefill_error_vs_chunk_size",
    "prefill_error_vs_length", "prefill_error_vs_position", "prefill_state_at_boundaries", "token_heatmap",
    "verdicts_by_module",
]
