"""The registered rewrite passes, in the order they run.

``DEFAULT_PASSES`` is an explicit tuple: importing a pass module registers nothing.
"""

from __future__ import annotations

from lnfuse.passes.layer_norm import LayerNormPass
from lnfuse.passes.rms_norm import RMSNormPass
from lnfuse.passes.rnn_hoist import RnnHoistPass

DEFAULT_PASSES = (LayerNormPass, RMSNormPass, RnnHoistPass)

__all__ = ["DEFAULT_PASSES", "LayerNormPass", "RMSNormPass"]
