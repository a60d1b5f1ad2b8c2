"""Training losses, each a small pure function in its own file, tested on hand-computed values.

Preference losses take per-sequence SUMMED log-probs of the policy (pi_*) and, where they need
a reference model, of the reference (ref_*), all shape [batch]; they return (loss, rewards)
where rewards = (chosen_reward, rejected_reward) are the implicit rewards logged as metrics.
"""
from avr_core.losses.dpo import dpo
from avr_core.losses.ipo import ipo
from avr_core.losses.rm_margin import rm_margin
from avr_core.losses.sft import sft
from avr_core.losses.simpo import simpo

PREFERENCE_LOSSES = {"dpo": dpo, "ipo": ipo, "simpo": simpo, "rm_margin": rm_margin}
NEEDS_REFERENCE = {"dpo", "ipo", "rm_margin"}

__all__ = ["sft", "dpo", "ipo", "simpo", "rm_margin", "PREFERENCE_LOSSES", "NEEDS_REFERENCE"]
