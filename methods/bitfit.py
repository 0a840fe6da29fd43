"""BitFit (Ben Zaken et al., 2022): every bias of the backbone trains, norm biases included."""
from methods.base import Component


class BitFit(Component):
    name = "bitfit"

    def apply(self, learner):
        for name, p in learner.model.backbone.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
