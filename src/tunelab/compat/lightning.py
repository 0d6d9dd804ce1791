"""Workarounds for Lightning.

**bf16-mixed refuses to clip with a fused optimizer** (lightning 2.6.x, ``MixedPrecision.clip_gradients``): the
AMP plugin raises "does not allow for gradient clipping because it performs unscaling of gradients internally"
for every optimizer with ``_step_supports_amp_scaling`` (torch's fused AdamW), although under ``bf16-mixed``
there is no grad scaler and the gradients are never scaled. :class:`BF16MixedPrecision` clips as the plain
precision plugin does when no scaler exists. Under ``16-mixed`` the refusal is real (the plugin then skips
``scaler.unscale_`` for such optimizers, so clipping would see scaled gradients): that combination is refused at
config time instead. ``tests/test_precision.py::test_lightning_still_refuses_fused_clipping_under_bf16`` fails
once Lightning stops refusing, and this module can go.
"""

from __future__ import annotations

from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim import Optimizer


class BF16MixedPrecision(MixedPrecision):
    """Lightning's ``bf16-mixed`` autocast plugin that clips gradients with any optimizer, fused ones included."""

    def __init__(self, device: str) -> None:
        super().__init__("bf16-mixed", device)

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        """The base plugin's clipping: bf16 gradients carry no loss scale, so nothing needs unscaling first."""
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
