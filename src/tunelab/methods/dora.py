"""DoRA (Liu et al., 2024): weight-decomposed LoRA, through peft (``use_dora=True``).

Each target weight is split into a magnitude and a direction: W' = m * (W + s B A) / ||W + s B A||_c, where
||.||_c is the per-output-feature (row) norm, s = alpha / r, and the magnitude vector m (d_out, initialised to
||W||_c) trains with A and B, so the adapted model starts equal to the base. Merging folds W' into W.
Every lora knob applies (``configs/method/dora.yaml`` extends ``lora.yaml``).
"""

from __future__ import annotations

from dataclasses import replace

from tunelab.methods.lora import LORA
from tunelab.methods.spec import METHODS

METHODS.register(replace(LORA, name="dora"))
