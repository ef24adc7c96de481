"""CapsNet of Sabour, Frosst & Hinton 2017, configurable so the same class scales to large capsule models.

Pure torch: Conv1 -> PrimaryCaps -> one or more routed capsule layers -> (optional) masked decoder.
The paper's MNIST model is `CapsNet()`: 8,215,568 parameters, 6,804,224 without the decoder.
"""

from __future__ import annotations

import inspect
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from capsdist.checkpoint.card import write_card
from capsdist.checkpoint.model_state import ModelState, read_model_state
from capsdist.checkpoint.weights import CONFIG_KEY, FOLDER_WEIGHTS, bad_file, read_header, read_tensors, write_weights
from capsdist.core.errors import CapsdistError
from capsdist.core.rules import ConfigError, check
from capsdist.core.shipped import WEIGHTS, weights_path
from capsdist.model.conv import strided_conv2d
from capsdist.model.routing import RoutingStats, dynamic_routing, squash
from capsdist.model.rules import MODEL_RULES
from capsdist.model.streaming import streaming_routing

WEIGHT_INITS = ("paper", "scaled")
PAPER_STD = 0.01  # the paper's W_ij ~ N(0, 0.01^2), whatever the layer's size
# What the "scaled" init assumes and aims at. Routed inputs are squashed outputs of a layer that starts at |s| ~ 1
# (squash(1) = 1/2); primaries start shorter under PyTorch's default conv init, measured 0.10-0.14 on MNIST and
# MultiMNIST. At uniform coupling (routing's first round) |s| starts at 1/2; the agreement rounds then concentrate
# each input's coupling and lengthen it to ~1 (measured after 3 rounds: 1.19 and 0.65 for configs/large_cpu.yaml's
# two layers, 1.10 for the paper's layer), where squash's slope 2|s|/(1+|s|^2)^2 is near its largest.
ROUTED_INPUT_LENGTH = 0.5
PRIMARY_INPUT_LENGTH = 0.1
FIRST_ROUND_LENGTH = 0.5


def scaled_std(n_in: int, d_out: int, n_out: int, input_length: float) -> float:
    """Std of W_ij that gives each output capsule a pre-squash length |s_j| ~ FIRST_ROUND_LENGTH at coupling 1/n_out.

    s_j = (1/n_out) sum_i W_ij u_i sums n_in independent d_out-vectors of variance std^2 |u_i|^2 per component, so
    E|s_j|^2 = n_in d_out std^2 |u|^2 / n_out^2. With the paper's fixed 0.01 instead, a layer behind thousands of
    inputs starts at |s| ~ 0.01, squash ~ |s|^2 shrinks that to ~1e-4, and a second routed layer leaves class
    lengths ~1e-13 and gradients ~1e-21: far below Adam's eps (1e-8), so nothing trains.
    """
    return FIRST_ROUND_LENGTH * n_out / (input_length * (n_in * d_out) ** 0.5)


class CapsOutput(NamedTuple):
    """What CapsNet returns: the class capsules, their lengths and the reconstructions (or None)."""

    caps: torch.Tensor  # [B, n_classes, d]
    lengths: torch.Tensor  # [B, n_classes], float32
    recon: torch.Tensor | None  # [B, K, C, H, W]


def conv_out(size: int, kernel: int, stride: int = 1) -> int:
    """Spatial size after an unpadded convolution."""
    out = (size - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"a {kernel}x{kernel} stride-{stride} convolution does not fit a {size}x{size} input")
    return out


class PrimaryCaps(nn.Module):
    """A convolution whose output channels are grouped into `channels` maps of `dim`-D capsules, squashed."""

    def __init__(self, in_channels: int, channels: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.channels, self.dim = channels, dim
        self.conv = nn.Conv2d(in_channels, channels * dim, kernel, stride=stride)
        self.fast_weight_grad = True  # CPU: weight gradient as a dilated forward conv (capsdist.model.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> capsules [B, channels*H'*W', dim] (ordered channel-major)."""
        y = strided_conv2d(x, self.conv) if self.fast_weight_grad else self.conv(x)
        batch, _, h, w = y.shape
        y = y.view(batch, self.channels, self.dim, h * w).transpose(2, 3)
        return squash(y.reshape(batch, self.channels * h * w, self.dim))


class CapsLayer(nn.Module):
    """A routed capsule layer: a separate W_ij (d_out x d_in) per (input i, output j) pair, no bias.

    With `chunk_size` C, routing streams over C input capsules at a time (`capsdist.model.streaming`): the priors of
    at most C inputs exist at once in forward and backward, for the same values and gradients (0: C picked from
    the tensor sizes, `capsdist.model.streaming.auto_chunk`).
    """

    def __init__(
        self,
        n_in: int,
        d_in: int,
        n_out: int,
        d_out: int,
        iterations: int = 3,
        detach: bool = False,
        chunk_size: int | None = None,
        init_std: float = PAPER_STD,
    ) -> None:
        super().__init__()
        self.n_in, self.d_in, self.n_out, self.d_out = n_in, d_in, n_out, d_out
        self.iterations, self.detach, self.chunk_size = iterations, detach, chunk_size
        self.routing_stats: RoutingStats | None = None  # set by capsdist.model.routing.attach_routing_stats
        self.weight = nn.Parameter(torch.randn(n_in, n_out, d_out, d_in) * init_std)

    def priors(self, u: torch.Tensor) -> torch.Tensor:
        """Prediction vectors u_hat_j|i = W_ij u_i: [B, n_in, d_in] -> [B, n_in, n_out, d_out].

        One batched matmul over the input capsules; W is never broadcast over the batch.
        """
        # reshape, not view: model.to(memory_format=channels_last) also restrides this 4-D weight
        w = self.weight.reshape(self.n_in, self.n_out * self.d_out, self.d_in).transpose(1, 2)
        u_hat = torch.bmm(u.transpose(0, 1).to(w.dtype), w)  # [n_in, B, n_out*d_out]
        return u_hat.view(self.n_in, -1, self.n_out, self.d_out).transpose(0, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Input capsules [B, n_in, d_in] -> routed output capsules [B, n_out, d_out]."""
        if self.chunk_size is not None:  # records no routing statistics (the coupling never exists whole)
            return streaming_routing(u, self.weight, self.iterations, self.detach, self.chunk_size or None)
        return dynamic_routing(self.priors(u), self.iterations, self.detach, self.routing_stats, owned=True)


class Decoder(nn.Module):
    """FC decoder from the masked class capsules to an image: 512 -> 1024 -> C*H*W sigmoid in the paper."""

    def __init__(self, n_caps: int, dim: int, hidden: Sequence[int], out_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.out_shape = out_shape
        widths = [n_caps * dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers += [nn.Linear(widths[-1], out_shape[0] * out_shape[1] * out_shape[2]), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, caps: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """Reconstruct one image per selected capsule: caps [B, n, d], select [B, K] -> [B, K, C, H, W].

        Each reconstruction sees only its own capsule (all others zeroed), as in the paper.
        """
        batch, n, d = caps.shape
        k = select.shape[1]
        mask = torch.zeros(batch, k, n, 1, device=caps.device, dtype=caps.dtype)
        mask.scatter_(2, select.view(batch, k, 1, 1), 1.0)
        masked = (caps.unsqueeze(1) * mask).view(batch * k, n * d)
        return self.net(masked).view(batch, k, *self.out_shape)


class CapsNet(nn.Module):
    """Conv1 -> PrimaryCaps -> routed capsule layers -> class capsules (+ masked decoder).

    `caps_layers` lists (count, dim) of each routed layer after PrimaryCaps; the last count is the number of
    classes. Defaults are the paper's MNIST model; image_size=36 gives the MultiMNIST model (3,200 primaries).
    `routing_chunk_size` streams every routed layer over that many input capsules at a time (see CapsLayer).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        conv_channels: int = 256,
        conv_kernel: int = 9,
        primary_channels: int = 32,
        primary_dim: int = 8,
        primary_kernel: int = 9,
        primary_stride: int = 2,
        caps_layers: Sequence[tuple[int, int]] | None = None,
        routing_iterations: int = 3,
        detach_routing: bool = False,
        decoder_hidden: Sequence[int] = (512, 1024),
        reconstruction: bool = True,
        routing_chunk_size: int | None = None,
        weight_init: Literal["paper", "scaled"] = "paper",
    ) -> None:
        """Build the network; the defaults are the paper's MNIST model.

        Args:
            in_channels: image channels (MNIST: 1).
            image_size: input height and width in pixels (MNIST 28, MultiMNIST 36; the CLI takes it from the data).
            num_classes: class capsules, one per class (the last caps_layers count).
            conv_channels: Conv1's output channels (paper: 256).
            conv_kernel: Conv1's kernel size (paper: 9).
            primary_channels: PrimaryCaps capsule maps (paper: 32).
            primary_dim: dimensions of each primary capsule (paper: 8).
            primary_kernel: PrimaryCaps convolution's kernel size (paper: 9).
            primary_stride: PrimaryCaps convolution's stride (paper: 2).
            caps_layers: [count, dim] of each routed capsule layer after PrimaryCaps (default: [[num_classes, 16]]).
            routing_iterations: routing-by-agreement iterations (paper: 3).
            detach_routing: stop gradients through all but the last routing round (same forward, cheaper backward).
            routing_chunk_size: stream each routed layer over this many input capsules at a time, forward and
                backward (capsdist.model.streaming: same values, memory no longer grows with inputs x outputs); 0: a
                size picked from the tensor sizes; None: off.
            decoder_hidden: widths of the decoder's hidden layers (paper: [512, 1024]).
            reconstruction: whether to build the decoder (reconstruction loss and images).
            weight_init: routed layers' W_ij: "paper" N(0, 0.01^2) (the paper; fine for one routed layer), "scaled"
                a std from each layer's shape so every routed layer starts where squash passes gradient
                (capsdist.model.scaled_std; needed for stacks of routed layers behind thousands of primaries).
        """
        args = locals()
        super().__init__()
        self.config = {name: args[name] for name in MODEL_ARGS}  # the arguments as given; save_pretrained writes them
        self.num_classes = num_classes  # what labels may be (image_shards refuses any other before a step)
        layers = [tuple(layer) for layer in (caps_layers or [(num_classes, 16)])]
        if layers[-1][0] != num_classes:
            raise ValueError(
                f"the last capsule layer has {layers[-1][0]} capsules but num_classes is {num_classes}: "
                "set caps_layers[-1] to (num_classes, dim)"
            )
        grid = conv_out(conv_out(image_size, conv_kernel), primary_kernel, primary_stride)
        self.num_primary = primary_channels * grid * grid
        self.conv1 = nn.Conv2d(in_channels, conv_channels, conv_kernel)
        self.primary = PrimaryCaps(conv_channels, primary_channels, primary_dim, primary_kernel, primary_stride)
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init is {weight_init!r}: use one of {', '.join(WEIGHT_INITS)}")
        dims = [(self.num_primary, primary_dim), *layers]
        lengths = [PRIMARY_INPUT_LENGTH] + [ROUTED_INPUT_LENGTH] * (len(layers) - 1)
        self.caps = nn.ModuleList(
            CapsLayer(n_in, d_in, n_out, d_out, routing_iterations, detach_routing, routing_chunk_size, std)
            for (n_in, d_in), (n_out, d_out), length in zip(dims[:-1], dims[1:], lengths, strict=True)
            for std in [scaled_std(n_in, d_out, n_out, length) if weight_init == "scaled" else PAPER_STD]
        )
        out_dim = layers[-1][1]
        shape = (in_channels, image_size, image_size)
        self.decoder = Decoder(num_classes, out_dim, decoder_hidden, shape) if reconstruction else None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "capsnet-mnist", device: str | torch.device = "cpu") -> CapsNet:
        """A float32 CapsNet in eval mode, its architecture read from the file, from any of: shipped weights by name
        ("capsnet-mnist", 99.60% on MNIST's test digits; "capsnet-multimnist", 36x36 overlays of two digits, both
        right on 80.5%); a .safetensors file (`capsdist-pretrained export`) or a
        folder written by `save_pretrained`; a training checkpoint, a single .ckpt file or capsdist's sharded .ckpt
        directory. Files are read safely (safetensors, or torch.load with weights_only): nothing in them runs."""
        path = weights_path(name_or_path)
        if (path / FOLDER_WEIGHTS).is_file():
            path = path / FOLDER_WEIGHTS
        if not path.exists():
            raise CapsdistError(
                f"no model at {path}. Fix: pass the name of shipped weights ({', '.join(WEIGHTS)}), a .safetensors "
                "file, a folder written by CapsNet.save_pretrained, or a training checkpoint (a .ckpt file, or the "
                ".ckpt directory of a sharded one)."
            )
        if path.is_dir() or zipfile.is_zipfile(path):  # torch.save's format: a training checkpoint
            return load_checkpoint(path, device)[0]
        return load_weights(path, device)[0]

    def save_pretrained(
        self,
        folder: str | Path,
        metadata: Mapping[str, Any] | None = None,
        datasets: Sequence[str] = (),
        license: str = "mit",
    ) -> Path:
        """Write this model into ``folder`` as `from_pretrained` reads it back: ``model.safetensors`` (the weights in
        fp16 with this model's ``CapsNet(**config)`` arguments, the format of the shipped weights) and a README.md
        model card with Hugging Face-style front matter (``library_name: capsdist``, ``license``, tags, ``datasets``
        such as ["mnist"], the metrics found in ``metadata``). ``metadata`` (JSON values, e.g. {"test_accuracy":
        0.99}) is stored in the file and listed on the card. Returns the weights file's path."""
        folder = Path(folder)
        if folder.suffix == ".safetensors":
            raise CapsdistError(
                f"save_pretrained writes a folder (the weights and a model card), and {folder} names a file. Fix: "
                f"pass a folder, e.g. {folder.with_suffix('')}; from_pretrained takes that folder back."
            )
        config, metadata = plain_config(self.config), dict(metadata or {})
        weights = write_weights(self.state_dict(), config, folder / FOLDER_WEIGHTS, metadata)
        write_card(folder, config, metadata, sum(p.numel() for p in self.parameters()), datasets, license)
        return weights

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, k: int = 1) -> CapsOutput:
        """Class capsules for images x [B, C, H, W]; reconstructions masked by `labels` [B, K] when given
        (training), else by the k longest capsules (test)."""
        u = self.primary(torch.relu(self.conv1(x)))
        for layer in self.caps:
            u = layer(u)
        lengths = u.float().pow(2).sum(-1).add(1e-12).sqrt()
        recon = None
        if self.decoder is not None:
            select = labels if labels is not None else lengths.topk(k, dim=1).indices
            recon = self.decoder(u, select)
        return CapsOutput(u, lengths, recon)


MODEL_ARGS = tuple(inspect.signature(CapsNet).parameters)


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """CapsNet arguments as plain JSON values (tuples as lists), as weights files store them."""
    return json.loads(json.dumps(dict(config), default=list))


class ForgedSettings(CapsdistError):
    """A file's model settings that the CLI refuses or that do not describe the tensors it holds (the reason only:
    callers name the file and the fix)."""


def build_model(settings: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> CapsNet:
    """An (uninitialised) CapsNet of a file's model ``settings``, checked with the training CLI's rules and built
    only when its tensors have exactly the ``shapes`` the file holds: settings read from a file never allocate more
    memory than the file's own tensors."""
    try:
        check("model", settings, MODEL_RULES)
        with torch.device("meta"):  # shapes only, no memory
            model = CapsNet(**{k: v for k, v in settings.items() if k in MODEL_ARGS})
    except (ConfigError, ValueError, TypeError) as err:
        raise ForgedSettings(f"holds model settings the training CLI refuses: {err}") from None
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    held = {k: tuple(v) for k, v in shapes.items()}
    if wanted != held:
        name = min(set(wanted) ^ set(held) or {k for k in wanted if wanted[k] != held[k]})
        raise ForgedSettings(
            f"does not hold the tensors its model settings describe ({name}: settings {wanted.get(name, 'none')} vs "
            f"file {held.get(name, 'none')}; {sum(map(_numel, wanted.values())):,} parameters described, "
            f"{sum(map(_numel, held.values())):,} held), so no model was built"
        )
    return model.to_empty(device="cpu")


def _numel(shape: Sequence[int]) -> int:
    """Elements of a tensor of ``shape``."""
    return int(torch.Size(shape).numel())


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[CapsNet, dict[str, Any]]:
    """A float32 `CapsNet` in eval mode from a weights file (or shipped weights by name), and the file's metadata
    (JSON-decoded); the model's settings are checked and sized by the file before anything is allocated."""
    path = weights_path(path)
    meta, shapes = read_header(path)
    config = meta[CONFIG_KEY]
    if not isinstance(config, dict) or not set(config) <= set(MODEL_ARGS):
        wrong = sorted(set(config) - set(MODEL_ARGS)) if isinstance(config, dict) else f"a {type(config).__name__}"
        raise bad_file(path, f"{CONFIG_KEY} must be an object of CapsNet arguments, it has {wrong}")
    try:
        model = build_model(config, shapes)
    except ForgedSettings as err:
        raise bad_file(path, f"it {err}") from None
    try:
        model.load_state_dict(read_tensors(path))
    except RuntimeError as err:
        raise bad_file(path, f"weights do not fit its {CONFIG_KEY}: {str(err)[:160]}") from err
    return model.to(device).eval(), meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[CapsNet, ModelState]:
    """A float32 `CapsNet` in eval mode from a training checkpoint (a .ckpt file or a sharded .ckpt directory), and
    what the checkpoint holds of it; the settings are checked and sized by its tensors before anything is built."""
    state = read_model_state(path)
    try:
        model = build_model(state.hparams, {k: v.shape for k, v in state.weights.items()})
    except ForgedSettings as err:
        raise CapsdistError(
            f"{path} is refused: it {err}. Fix: pass a checkpoint written by `python -m capsdist.train fit` or by a "
            "Trainer fitting a CapsNetModule; this one is damaged or forged."
        ) from None
    model.load_state_dict(state.weights)
    return model.eval().to(device), state
