"""What "non-private" means for a job whose nodes always run DP-SGD: the study's non-private
column and the empirical audit's counterfactual are this one setting.

The highest epsilon a job accepts, calibrated with RDP (PRV at a huge epsilon costs minutes and
about 10 GB) and no floor on the noise, so each site's noise multiplier is what epsilon 10,000
needs (about 0.06 in the demo). Clipping stays: with Adam it rescales per-example gradients but
not the step, and it keeps the run on the node's own code path, never a node mode without DP.
"""

from __future__ import annotations

NON_PRIVATE_EPSILON = 10_000
NON_PRIVATE_OVERRIDES = ("privacy.accountant=rdp", f"privacy.epsilon={NON_PRIVATE_EPSILON}",
                         "privacy.min_noise_multiplier=0")
