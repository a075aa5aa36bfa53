"""Output-space adversarial adaptation: AdaptSegNet (Tsai et al., "Learning to Adapt Structured Output
Space for Semantic Segmentation", CVPR 2018).

Segmenter: CE on source + lambda_adv * BCE(D(softmax(target logits)), source); D: BCE on the detached
source (0) and target (1) softmaxes, each half-weighted. Multi-level: a second discriminator on the first
aux output. The discriminators and their step are `blocks.OutputAdversary` (shared with ADVENT's AdvEnt and
self-training's optional adversarial term).
"""

from __future__ import annotations

from torch import Tensor

from uda_ray.methods.blocks import AdversarialConfig, OutputAdversarialMethod, d_input_size

__all__ = ["Adversarial", "AdversarialConfig", "d_input_size"]


class Adversarial(OutputAdversarialMethod):
    """AdaptSegNet output-space adversarial training (one or two discriminators)."""

    Config = AdversarialConfig

    @staticmethod
    def d_input(probs: Tensor) -> Tensor:
        """What D sees, from (B, C, H, W) probabilities: AdaptSegNet the probabilities themselves."""
        return probs
