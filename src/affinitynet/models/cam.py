"""Class activation maps (paper 3.1, 4.2; Eq. 1-2).

The CAM network is a backbone at output stride 8, a 3x3 convolution with 512 channels, global
average pooling and a fully connected layer without bias, trained with a multi-label soft margin
loss. CAMs are the FC weights applied at every position of the map before pooling (Eq. 1).

Heads (``head=``, config key ``cam.head``), i.e. what f_cam of Eq. 1 is:

- ``"conv"`` (default, Section 4.2): the 3x3 convolution with ``head_channels`` channels and a ReLU
  on the backbone's last map.
- ``"psa"``: the authors' released AffinityNet code (``res38_cls.pth``): no adaptation layer, the
  1x1 classifier (its ``fc8``) reads the backbone's 4096 channels directly, with channel dropout
  0.5 on them during training only (its ``dropout7``); CAM = ReLU(conv(features, fc8)).
- ``"irn"``: the authors' IRNet code (``res50_cam.pth``): the same 1x1 classifier on the backbone's
  last map, without the dropout.

The two released layouts hold the same parameters (the classifier alone); only training differs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.multiscale import multiscale_maps
from ..registry import Registry

NORMALISATION_EPS = 1e-5   # the released code divides by (max + 1e-5)
PSA_DROPOUT = 0.5            # psa's dropout7 before GAP (training only)

# f_cam of Eq. 1 (config key ``cam.head``): a builder ``(in_channels, head_channels) -> (module,
# its output channels)``.
HEADS = Registry("CAM head")
register_head = HEADS.register


@register_head("conv", description="the 3x3 conv with head_channels channels and a ReLU (Section 4.2)")
def conv_head(in_channels: int, head_channels: int) -> tuple[nn.Module, int]:
    head = nn.Sequential(nn.Conv2d(in_channels, head_channels, 3, padding=1, bias=False), nn.ReLU(inplace=True))
    nn.init.kaiming_normal_(head[0].weight, nonlinearity="relu")
    return head, head_channels


# The released layouts have no parameters in f_cam: the state dict is the backbone's and the
# classifier's, as in the released files. Dropout2d is the identity in eval mode, so CAMs never see it.
@register_head("psa", description="psa's res38_cls.pth: the classifier on the backbone, dropout 0.5 in training")
def psa_head(in_channels: int, head_channels: int) -> tuple[nn.Module, int]:
    return nn.Dropout2d(PSA_DROPOUT), in_channels


@register_head("irn", description="irn's res50_cam.pth: the classifier on the backbone")
def irn_head(in_channels: int, head_channels: int) -> tuple[nn.Module, int]:
    return nn.Identity(), in_channels


class CAMNet(nn.Module):
    """Backbone + f_cam head (see the module docstring for ``head``) + GAP + 1x1 classifier."""

    def __init__(self, backbone: nn.Module, num_object_classes: int, head_channels: int = 512,
                 head: str = "conv"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown CAM head '{head}' (choose from {', '.join(HEADS.names())})")
        self.backbone = backbone
        self.head_name = head
        self.head, features = HEADS.build(head, backbone.out_channels[-1], head_channels)
        self.classifier = nn.Conv2d(features, num_object_classes, 1, bias=False)
        # Small initial logits: a loss far above log 2 in the first steps wastes the few steps a CPU run has.
        nn.init.normal_(self.classifier.weight, std=0.01)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """f_cam of Eq. 1: the map before global average pooling."""
        return self.head(self.backbone(images)[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image-level logits (N, K): FC after GAP. The FC is a 1x1 conv so that the same weights
        give the CAMs; pooling first and classifying after is the same linear map."""
        return self.classify(self.features(images))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Image-level logits (N, K) of f_cam maps (N, D, h, w): GAP, then the FC."""
        return self.classifier(F.adaptive_avg_pool2d(features, 1)).flatten(1)

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        """M_c(x, y) = w_c^T f_cam(x, y) (Eq. 1), before ReLU and normalisation: (N, K, h, w)."""
        return self.classifier(self.features(images))

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) + list(self.classifier.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())


class ReCAMNet(CAMNet):
    """The CAM network with ReCAM's second classifier (Chen et al., CVPR 2022), fine-tuned from a
    trained CAM network. Each present class's CAM (ReLU'd, max-normalised) pools f_cam into one
    feature per class, which ``recam`` (a 1x1 conv without bias, as the classifier) classifies
    with a softmax cross-entropy: a class whose map also covers another class's pixels pools a
    feature that the softmax confuses, so the loss pushes each map off the others' regions. The
    maps are then read with the product of the two classifiers' weights (:meth:`cams`)."""

    def __init__(self, backbone: nn.Module, num_object_classes: int, head_channels: int = 512,
                 head: str = "conv"):
        super().__init__(backbone, num_object_classes, head_channels, head)
        self.recam = nn.Conv2d(self.classifier.in_channels, num_object_classes, 1, bias=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image-level logits (N, K), ReCAM logits (N, K, K)): row c of an image's ReCAM logits
        classifies the feature its class-c CAM pools, whether or not c is present."""
        features = self.features(images)
        maps = divide_by_peak(F.relu(self.classifier(features)))
        pooled = torch.einsum("nkhw,ndhw->nkd", maps, features) / (features.shape[2] * features.shape[3])
        return self.classify(features), F.linear(pooled, self.recam.weight.flatten(1))

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        """ReCAM's maps: f_cam under the element-wise product of the two classifiers' weights,
        before ReLU and normalisation: (N, K, h, w)."""
        return F.conv2d(self.features(images), self.recam.weight * self.classifier.weight)

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.recam.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Everything the CAM network trained: fine-tuned at the base rate, the new classifier at
        new_layer_lr_mult times it."""
        return super().backbone_parameters() + super().new_parameters()

    def with_recam(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A CAM network's state dict completed with this network's (untrained) ReCAM classifier:
        what :meth:`load_state_dict` takes to start the fine-tuning."""
        return {**state, **{f"recam.{key}": value for key, value in self.recam.state_dict().items()}}


def recam_loss(logits: torch.Tensor, recam_logits: torch.Tensor, targets: torch.Tensor,
               weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ReCAM's training loss on :meth:`ReCAMNet.forward`'s outputs and the images' multi-hot tags
    (N, K): the multi-label soft margin loss plus ``weight`` times the softmax cross-entropy of
    each present class's pooled feature against that class, averaged over an image's classes and
    then over the batch. Returns (loss, the cross-entropy term)."""
    image, cls = (targets > 0).nonzero(as_tuple=True)
    per_image = (targets > 0).sum(1).clamp(min=1).to(recam_logits.dtype)
    terms = F.cross_entropy(recam_logits[image, cls].float(), cls, reduction="none")
    cross_entropy = (terms / per_image[image]).sum() / len(targets)
    return F.multilabel_soft_margin_loss(logits, targets) + weight * cross_entropy, cross_entropy


def normalise_cams(summed: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Keep the image's classes (1-based indices into the K object classes) and divide each map by
    its maximum so the peak is 1 (Eq. 1's normalisation). Input (K, H, W) of ReLU'd scores."""
    index = torch.as_tensor([c - 1 for c in classes], dtype=torch.long, device=summed.device)
    return divide_by_peak(summed.index_select(0, index) if len(classes) else summed[:0])


def divide_by_peak(maps: torch.Tensor) -> torch.Tensor:
    """Each map (the last two dimensions) divided by its maximum, so the peak is 1 (Eq. 1's
    normalisation, with the released code's epsilon)."""
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + NORMALISATION_EPS)


class CAMMethod:
    """How class maps are read off a trained CAM network (pytorch-grad-cam's ``BaseCAM``): a
    method overrides :meth:`maps`; the multi-scale + flip inference, the ReLU, the sum and the
    max-normalisation of Eq. 1 are shared. They run without autograd; a method that needs
    gradients enables them inside :meth:`maps` (as :class:`GradCAM` does)."""

    def maps(self, model: CAMNet, batch: torch.Tensor) -> torch.Tensor:
        """Class maps (N, K, h, w) of a batch of normalised images, before ReLU."""
        raise NotImplementedError

    def __call__(self, model: CAMNet, image: torch.Tensor, classes: Sequence[int], scales: Sequence[float],
                 flip: bool) -> torch.Tensor:
        """Multi-scale + flip maps of one normalised image (3, H, W) for its present classes:
        ReLU'd maps of every scale and mirror, upsampled to the image, summed, max-normalised.
        Returns (len(classes), H, W) in [0, 1]."""
        if not classes:
            return image.new_zeros((0,) + tuple(image.shape[-2:]))
        maps = multiscale_maps(lambda batch: F.relu(self.maps(model, batch)).detach(), image, scales, flip)
        return normalise_cams(torch.stack(maps).sum(0), classes)


# CAM methods (config key ``cam.method``): a CAMMethod subclass, built without arguments; a
# method that needs a network of its own names it (``network=``, a registered network's kind).
METHODS = Registry("CAM method")
register_method = METHODS.register


def method_network(method: str) -> str:
    """The network (``models.networks``) whose maps CAM method ``method`` reads: the CAM
    network's, ``cam``, unless the method registered another. An unknown name reads the CAM
    network's: the graph is drawn before the names are checked (``pipeline.settings``)."""
    return METHODS.get(method).info.get("network", "cam") if method in METHODS else "cam"


@register_method("cam", description="Eq. 1: the classifier's weights applied at every position of f_cam")
class ClassActivationMap(CAMMethod):
    def maps(self, model: CAMNet, batch: torch.Tensor) -> torch.Tensor:
        return model.cams(batch)


@register_method("recam", network="recam",
                 description="ReCAM (Chen et al., CVPR 2022): Eq. 1 with the product of the classifier's and "
                             "ReCAM's weights, after train-recam")
class ReactivatedCAM(ClassActivationMap):
    """Eq. 1 on :class:`ReCAMNet`, whose ``cams`` are ReCAM's maps."""


@register_method("gradcam", description="Grad-CAM (Selvaraju et al.): f_cam's channels weighted by the spatial mean "
                                        "of the class score's gradient")
class GradCAM(CAMMethod):
    """Grad-CAM on f_cam. With the GAP + linear classifier of 3.1 each class's gradient is
    w_c / (h w) at every position, so its map is the CAM divided by the map's area: after
    normalisation the same at one scale, weighted towards the small scales over several."""

    def maps(self, model: CAMNet, batch: torch.Tensor) -> torch.Tensor:
        # The backbone runs without a graph: the gradient is taken at f_cam only.
        features = model.features(batch).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model.classify(features)
            weights = torch.stack([torch.autograd.grad(logits[:, c].sum(), features, retain_graph=True)[0].mean((2, 3))
                                   for c in range(logits.shape[1])], dim=1)
        return torch.einsum("nkd,ndhw->nkhw", weights, features.detach())


def infer_cams(model: CAMNet, image: torch.Tensor, classes: Sequence[int], scales: Sequence[float],
               flip: bool, method: str = "cam") -> torch.Tensor:
    """Multi-scale + flip maps of one normalised image (3, H, W) for its present classes by the
    registered CAM ``method`` (:class:`CAMMethod`). Returns (len(classes), H, W) in [0, 1]."""
    return METHODS.build(method)(model, image, classes, scales, flip)
