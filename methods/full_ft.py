"""Full fine-tuning: every backbone parameter trains."""
from methods.base import Component


class FullFineTune(Component):
    name = "full_ft"

    def apply(self, learner):
        for p in learner.model.backbone.parameters():
            p.requires_grad_(True)
