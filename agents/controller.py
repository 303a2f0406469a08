"""The trained controller as a product: score images, save, load."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iqa_env.checks import is_flag
from iqa_env.files import atomic_write, atomic_write_text
from iqa_env.networks import ControllerBackbone

FORMAT = "iqa-controller"
FORMAT_VERSION = 1
OUTPUTS: tuple[str, ...] = ("sigmoid", "clip")
CONFIG_NAME = "controller.json"
WEIGHTS_NAME = "controller.pt"


#: The most reference scores a controller keeps (larger reference sets keep evenly spaced order statistics).
REFERENCE_MAX = 4096


def check_reference(reference: Any) -> dict[str, Any]:
    """``reference`` as :meth:`Controller.calibrate` writes it, or a ``ValueError`` saying what is wrong."""
    if not isinstance(reference, dict) or not isinstance(reference.get("scores"), list):
        raise ValueError(
            "expected an object with 'scores' (a sorted list of reference scores), 'images' and 'source', "
            f"got {type(reference).__name__}"
        )
    try:
        scores = np.asarray(reference["scores"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"'scores' must be numbers ({e})") from e
    if scores.ndim != 1 or len(scores) < 2 or not np.all(np.isfinite(scores)):
        raise ValueError(f"'scores' must be at least 2 finite numbers, got {len(np.atleast_1d(scores))} values")
    if np.any(np.diff(scores) < 0) or scores[0] < 0.0 or scores[-1] > 1.0:
        raise ValueError("'scores' must be sorted, in [0, 1]")
    images = reference.get("images", len(scores))
    if not isinstance(images, int) or isinstance(images, bool) or images < len(scores):
        raise ValueError(f"'images' must be the whole number of reference images (>= {len(scores)}), got {images!r}")
    return {"source": str(reference.get("source", "")), "images": images, "scores": scores.tolist()}


class Controller:
    """A task-amenability scorer: ``score(images) -> (N,)`` in [0, 1], higher = more amenable.

    Build it from a trained agent with :meth:`from_agent`; keep it with
    :meth:`save` (a folder with ``controller.json`` and ``controller.pt``) and
    :meth:`load` (weights are read with ``torch.load(weights_only=True)``: no
    arbitrary objects are unpickled).

    :param backbone: the controller network; its logit gives the score
    :param output: ``"sigmoid"`` (score = sigmoid(logit)) or ``"clip"`` (score = clip(logit, 0, 1))
    :param metadata: JSON-serialisable facts kept with the weights (algorithm, task, reward, ...)
    :param reference: the sorted scores of a reference set of images (see :meth:`calibrate`), or None
    :param mirror_average: score each image as the mean of the network's scores of the image and of its
        mirror image (left-right): a quality score that does not depend on which way round the image is.
        On the built-in set and Fashion-MNIST it ranks the holdout higher for the weighted and selective
        rewards on every seed (``docs/learning-status.md``, section 86); ``iqa train`` and ``iqa reproduce``
        set it unless told ``--no-mirror-average``. Leave it off for images whose mirror is another kind of
        image (text, a known side).

    A score's scale is the run's own: two controllers that rank the same
    images alike may score them around 0.1 and around 0.9 (the level
    depends on the seed and the algorithm). Compare and threshold scores
    from different controllers by :meth:`percentile` against a reference
    set of images, which `iqa train` records (its validation images).
    """

    def __init__(
        self,
        backbone: ControllerBackbone,
        output: str = "sigmoid",
        metadata: dict[str, Any] | None = None,
        reference: dict[str, Any] | None = None,
        mirror_average: bool = False,
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if not is_flag(mirror_average):
            raise ValueError(f"mirror_average must be True or False, got {type(mirror_average).__name__} {mirror_average!r}")
        self.mirror_average = bool(mirror_average)
        self.backbone = backbone.eval()
        self.output = output
        self.metadata = dict(metadata or {})
        self.reference = None if reference is None else check_reference(reference)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.backbone.image_shape

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to(self, device: str | torch.device) -> Controller:
        self.backbone.to(device)
        return self

    # ------------------------------------------------------------------ build
    @classmethod
    def from_agent(
        cls, agent: Any, metadata: dict[str, Any] | None = None, mirror_average: bool = False
    ) -> Controller:
        """The controller inside a trained agent whose policy is one of :mod:`agents.policies`.

        An agent that keeps a weight average of its policy (``REINFORCE(controller_average=...)``)
        gives the average. ``mirror_average``: as the constructor's.
        """
        policy = getattr(agent, "average_policy", None)
        if policy is None:
            policy = getattr(agent, "policy", agent)
        if not hasattr(policy, "controller_parts"):
            raise TypeError(
                f"{type(policy).__name__} has no per-sample controller; train with the policies of "
                "agents.policies (agents.make_agent does)"
            )
        extractor, head, scale, output = policy.controller_parts()
        backbone = ControllerBackbone(extractor.image_shape, width=extractor.width, embed_dim=extractor.embed_dim)
        backbone.features.load_state_dict(extractor.trunk.features.state_dict())
        with torch.no_grad():
            backbone.head.weight.copy_(head.weight * scale)
            backbone.head.bias.copy_(head.bias * scale)
        meta = {"algorithm": type(agent).__name__, **(metadata or {})}
        return cls(backbone.to(head.weight.device), output=output, metadata=meta, mirror_average=mirror_average)

    # ------------------------------------------------------------------ score
    def _as_batch(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim == 3 and self.image_shape[0] == 1:
            x = x.unsqueeze(1)  # (N, H, W) grey images
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, self.image_shape))}) "
                f"(or (N, H, W) for one channel), got {tuple(x.shape)}"
            )
        if x.dtype == torch.uint8:
            return x
        if not torch.is_floating_point(x):
            raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or infinite values")
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError(
                f"float images must be scaled to [0, 1], got values in [{float(x.min()):g}, {float(x.max()):g}]; "
                "pass uint8 images in [0, 255] as they are"
            )
        return x.float()

    @torch.no_grad()
    def score(self, images: np.ndarray | torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Amenability scores ``(N,)`` in [0, 1] of ``(N, C, H, W)`` images.

        ``uint8`` images are taken in [0, 255]; float images must be in [0, 1].
        Any number of images; they are scored in chunks of ``batch_size`` (small
        chunks stay in cache: on 2 CPU cores 16-image chunks scored about 2,850
        images/s against 1,380 for 1,024-image chunks).

        Scores are ``float64``: the sigmoid is taken in double precision, so
        that logits far from 0 (a controller whose scores all sit near 0 or 1)
        still rank the images instead of tying at exactly 1.0 (float32 rounds
        every logit above about 17 to 1.0).

        With :attr:`mirror_average`, each score is the mean of the scores of the
        image and of its mirror image (its columns in reverse order).
        """
        x = self._as_batch(images)
        if len(x) == 0:
            return np.zeros(0, dtype=np.float64)
        out = []
        for i in range(0, len(x), batch_size):
            chunk = x[i : i + batch_size].to(self.device)
            scores = self._scores(chunk)
            if self.mirror_average:
                scores = (scores + self._scores(chunk.flip(-1))) / 2
            out.append(scores)
        return torch.cat(out).cpu().numpy()

    def _scores(self, chunk: torch.Tensor) -> torch.Tensor:
        logits = self.backbone(chunk).double()
        return torch.sigmoid(logits) if self.output == "sigmoid" else logits.clamp(0.0, 1.0)

    # ---------------------------------------------------------- calibration
    def calibrate(self, images: np.ndarray | torch.Tensor, source: str = "") -> Controller:
        """Record the scores of ``images`` as the reference of :meth:`percentile` and :meth:`threshold`.

        The sorted scores are kept (at most :data:`REFERENCE_MAX` of them: evenly
        spaced order statistics of larger sets) and saved with the controller.
        ``source`` says what the images were (kept in ``reference["source"]``).
        Returns the controller.
        """
        scores = np.sort(self.score(images))
        if len(scores) < 2:
            raise ValueError(f"a reference needs at least 2 images, got {len(scores)}")
        if len(scores) > REFERENCE_MAX:
            scores = scores[np.linspace(0, len(scores) - 1, REFERENCE_MAX).round().astype(int)]
        self.reference = {"source": str(source), "images": int(len(images)), "scores": scores.tolist()}
        return self

    def _reference_scores(self) -> np.ndarray:
        if self.reference is None:
            raise ValueError(
                "this controller has no reference scores; calibrate it on images of known quality spread "
                "(Controller.calibrate(images), then save it); controllers saved by `iqa train` from this "
                "version on have them"
            )
        return np.asarray(self.reference["scores"], dtype=np.float64)

    def percentile(self, images: np.ndarray | torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """``(N,)`` in [0, 1]: the fraction of the reference images that score below each image.

        Ties count half (the mid-rank), so an image scored like every
        reference image gets 0.5. Unlike the raw score, this is comparable
        across controllers (seeds, algorithms) calibrated on the same images.
        """
        return self.percentile_of(self.score(images, batch_size=batch_size))

    def percentile_of(self, scores: np.ndarray) -> np.ndarray:
        """:meth:`percentile` of scores already computed with this controller."""
        ref = self._reference_scores()
        scores = np.asarray(scores, dtype=np.float64)
        below = np.searchsorted(ref, scores, side="left")
        not_above = np.searchsorted(ref, scores, side="right")
        return (below + not_above) / (2.0 * len(ref))

    def threshold(self, rejection_ratio: float) -> float:
        """The score below which an image is among the lowest ``rejection_ratio`` of the reference images.

        ``score(x) < threshold(r)`` rejects one image at a time, the same
        way whatever else is scored (the paper's rejection ranks a whole set).
        """
        from iqa_env.rewards import check_rejection_ratio

        ratio = check_rejection_ratio(rejection_ratio)
        ref = self._reference_scores()
        return float(np.quantile(ref, ratio)) if ratio > 0 else float("-inf")

    # -------------------------------------------------------------- save/load
    def config(self) -> dict[str, Any]:
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "image_shape": list(self.image_shape),
            "width": self.backbone.features[0][0].out_channels,
            "embed_dim": self.backbone.embed_dim,
            "output": self.output,
            "mirror_average": self.mirror_average,
            "metadata": self.metadata,
        }
        if self.reference is not None:
            config["reference"] = self.reference
        return config

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path/controller.json`` and ``path/controller.pt``, each atomically."""
        folder = Path(path)
        state = {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: torch.save(state, tmp))
        atomic_write_text(folder / CONFIG_NAME, json.dumps(self.config(), indent=2))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Controller:
        """Read a controller folder written by :meth:`save` (no arbitrary unpickling)."""
        folder = Path(path)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for p in (config_path, weights_path):
            if not p.is_file():
                inside = folder / "controller"  # given `iqa train`'s run folder instead of its controller
                hint = f"; did you mean {inside}?" if (inside / CONFIG_NAME).is_file() else ""
                raise FileNotFoundError(
                    f"{p} not found: a controller is a folder with {CONFIG_NAME} and {WEIGHTS_NAME} "
                    f"(written by Controller.save or `iqa train`){hint}"
                )
        from iqa_env.files import read_versioned_json

        config = read_versioned_json(config_path, FORMAT, FORMAT_VERSION, "a controller configuration")
        from iqa_env.env import resolve_device

        target = resolve_device(device)
        try:
            backbone = ControllerBackbone(
                tuple(config["image_shape"]), width=int(config["width"]), embed_dim=int(config["embed_dim"])
            )
            output = config["output"]
        except KeyError as e:
            raise ValueError(
                f"{config_path}: missing field {e}; expected the fields written by Controller.save"
            ) from e
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{config_path}: malformed controller settings ({e}); expected the fields written by "
                "Controller.save"
            ) from e
        if output not in OUTPUTS:
            raise ValueError(f"{config_path}: field 'output' must be one of {OUTPUTS}, got {output!r}")
        mirror_average = config.get("mirror_average", False)  # controllers saved before the field: off
        if not isinstance(mirror_average, bool):
            raise ValueError(f"{config_path}: field 'mirror_average' must be true or false, got {mirror_average!r}")
        metadata = config.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"{config_path}: field 'metadata' must be a JSON object, got {type(metadata).__name__}")
        reference = config.get("reference")
        if reference is not None:
            try:
                reference = check_reference(reference)
            except ValueError as e:
                raise ValueError(f"{config_path}: field 'reference': {e}") from e
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            backbone.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - torch's unpickler fails in many ways on a bad file
            # One line, not too long: torch's messages span many lines.
            from iqa_env.files import short_reason

            reason = short_reason(e)
            raise ValueError(
                f"{weights_path}: not a controller weights file for {config_path} ({reason}); expected "
                "the controller.pt written with it by Controller.save"
            ) from e
        return cls(
            backbone.to(target), output=output, metadata=metadata, reference=reference, mirror_average=mirror_average
        )
