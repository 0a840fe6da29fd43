"""Zero-shot: the pretrained backbone as it is. Nothing trains and there are no epochs; the
embedding is the backbone's final-norm CLS token, L2-normalised, without the head. Every DML
table should start from this row: it says what the pretraining alone gives (ViT-S/16 IN-21k
reaches about 83 R@1 on CUB)."""
from torch import nn

from methods.base import Component


class ZeroShot(Component):
    name = "zero_shot"

    def apply(self, learner):
        learner.model.head = nn.Identity()
        for p in learner.parameters():
            p.requires_grad_(False)
