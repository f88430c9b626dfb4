"""Losses of stage 0: reconstruction (L1/L2), KL, LPIPS, and a PatchGAN with hinge loss (taming / LDM recipe).

Kept out of the network: :class:`AutoencoderLoss` takes images, reconstructions and the posterior and returns
the generator's loss; :meth:`AutoencoderLoss.discriminator_loss` the discriminator's. The adversarial term
starts at ``disc_start`` steps and is weighted adaptively by the ratio of the gradient norms of the
reconstruction and adversarial losses at the decoder's last layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from emu.errors import ConfigError

LPIPS_BACKBONES = {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet1_1"}


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): one logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(width * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight=1e4):
    """||∇ rec|| / ||∇ adv|| at ``last_layer``: balances the adversarial term against reconstruction."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class PerceptualLoss(nn.Module):
    """LPIPS (torchmetrics' implementation, linear weights shipped with it) on images in [-1, 1].

    The ImageNet backbone is read from the torch hub cache (``weights_dir``/checkpoints, default
    ``torch.hub.get_dir()``); nothing is downloaded: without the file this fails with a message naming it.
    """

    def __init__(self, net: str = "vgg", weights_dir: str | None = None):
        super().__init__()
        import torchvision
        from torchmetrics.functional.image.lpips import _LPIPS

        if net not in LPIPS_BACKBONES:
            raise ConfigError("model.loss.lpips_net", f"must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
        hub_dir = str(Path(weights_dir).expanduser()) if weights_dir is not None else torch.hub.get_dir()
        arch = LPIPS_BACKBONES[net]
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        path = Path(hub_dir) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
        if not path.is_file():
            raise ConfigError(
                "model.loss.lpips_weights_dir",
                f"LPIPS needs the ImageNet {arch} weights at '{path}' (no downloads at run time): copy "
                f"{weights.url.rsplit('/', 1)[-1]} there from a connected machine, or set model.loss.lpips_weight=0",
            )
        previous = torch.hub.get_dir()
        torch.hub.set_dir(hub_dir)  # torchvision reads the backbone from the hub cache; restore it afterwards
        try:
            self.lpips = _LPIPS(pretrained=True, net=net).eval()
        finally:
            torch.hub.set_dir(previous)
        for p in self.lpips.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # the metric network always stays in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS distance, shape (B,)."""
        return self.lpips(x.float(), y.float()).flatten()


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of the autoencoder.

    Args:
        l1_weight, l2_weight: pixel reconstruction terms (mean over pixels).
        kl_weight: weight of the KL term (mean over the batch of the per-sample KL sum, divided by pixels).
        lpips_weight: perceptual term; 0 turns LPIPS off (the miniature's setting).
        lpips_net, lpips_weights_dir: LPIPS backbone and where its ImageNet weights are cached.
        disc_start: step at which the discriminator starts training and the adversarial term is added.
        disc_weight: scale of the adaptive adversarial weight.
        disc_width, disc_layers: PatchGAN size.
        adaptive: use the adaptive weight (else a constant ``disc_weight``).
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 1e-6,
        lpips_weight: float = 0.0,
        lpips_net: str = "vgg",
        lpips_weights_dir: str | None = None,
        disc_start: int = 50_000,
        disc_weight: float = 0.5,
        disc_width: int = 64,
        disc_layers: int = 3,
        adaptive: bool = True,
    ):
        super().__init__()
        self.l1_weight, self.l2_weight, self.kl_weight = l1_weight, l2_weight, kl_weight
        self.lpips_weight, self.disc_start, self.disc_weight, self.adaptive = (
            lpips_weight,
            disc_start,
            disc_weight,
            adaptive,
        )
        self.perceptual = PerceptualLoss(lpips_net, lpips_weights_dir) if lpips_weight > 0 else None
        self.discriminator = NLayerDiscriminator(3, disc_width, disc_layers)

    def adversarial_active(self, step: int) -> bool:
        return self.disc_weight > 0 and step >= self.disc_start

    def reconstruction(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logs = {}
        loss = torch.zeros((), device=x.device)
        if self.l1_weight:
            logs["l1"] = (recon - x).abs().mean()
            loss = loss + self.l1_weight * logs["l1"]
        if self.l2_weight:
            logs["l2"] = (recon - x).pow(2).mean()
            loss = loss + self.l2_weight * logs["l2"]
        if self.perceptual is not None:
            logs["lpips"] = self.perceptual(x, recon).mean()
            loss = loss + self.lpips_weight * logs["lpips"]
        logs["rec"] = loss
        return loss, logs

    def generator_loss(self, x, recon, posterior, step: int, last_layer: torch.Tensor | None = None):
        """Loss for the autoencoder's optimizer and a dict of its parts (detached)."""
        rec, logs = self.reconstruction(x, recon)
        logs["kl"] = posterior.kl().mean() / x[0].numel()
        loss = rec + self.kl_weight * logs["kl"]
        if self.adversarial_active(step):
            g_loss = -self.discriminator(recon).mean()
            if self.adaptive and last_layer is not None and torch.is_grad_enabled():
                weight = adaptive_weight(rec, g_loss, last_layer) * self.disc_weight
            else:
                weight = torch.tensor(self.disc_weight, device=x.device)
            logs["g_adv"], logs["adv_weight"] = g_loss, weight
            loss = loss + weight * g_loss
        logs["total"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(recon.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach() for k, v in logs.items()}
