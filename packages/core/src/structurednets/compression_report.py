"""What :func:`structurednets.compress` did: the replaced layers, those kept dense, and the
table ``str(report)`` prints."""

from __future__ import annotations

from dataclasses import dataclass

from structurednets.approximation import format_error

__all__ = ["CompressedLayer", "CompressionReport", "SkippedLayer"]


@dataclass(frozen=True)
class CompressedLayer:
    """One ``nn.Linear`` that was replaced.

    Attributes:
        name: its qualified module name in the model (``""`` for the model itself).
        input_dim, output_dim: its ``in_features`` and ``out_features``.
        structure: the structure it was replaced by.
        nb_parameters_before: the ``nn.Linear``'s parameters (weight and bias).
        nb_parameters_after: the structured layer's parameters (weight and bias).
        relative_error: ``||W_structured - W||_F / ||W||_F`` of the weight right after fitting.
        seconds: wall-clock time of the fit.
        output_relative_error: with calibration, ``||(W - W_structured) X^T||_F / ||W X^T||_F``
            on the inputs ``X`` the layer saw; ``None`` without calibration.
        cost_ratio: forward plus backward multiply-adds (batch 256) against the dense layer's;
            ``None`` for a structure that does not count its cost.
        nb_params_share: the share of ``in * out`` the layer was given (the uniform share,
            or what the global allocation chose).
    """

    name: str
    input_dim: int
    output_dim: int
    structure: str
    nb_parameters_before: int
    nb_parameters_after: int
    relative_error: float
    seconds: float
    output_relative_error: float | None = None
    cost_ratio: float | None = None
    nb_params_share: float | None = None


@dataclass(frozen=True)
class SkippedLayer:
    """A selected ``nn.Linear`` that was kept dense, and why (e.g. the budget is too small)."""

    name: str
    input_dim: int
    output_dim: int
    reason: str


@dataclass(frozen=True)
class CompressionReport:
    """What :func:`compress` did. ``str(report)`` is a table.

    Attributes:
        layers: the replaced layers, in module order (in call order with ``sequential=True``).
        skipped: selected layers kept dense, with the reason.
        model_nb_parameters_before, model_nb_parameters_after: parameters of the whole model.
        seconds: wall-clock time of the whole compression.
        allocation: ``"uniform"`` or ``"global"``.
        allocation_seconds: the part of ``seconds`` the global allocation took (its curves
            and choice; fits it made and kept are counted here, not again in the layers).
        weight_budget: with the global allocation, the weights the layers could hold in all
            (``share`` times the dense weights of the layers it could give a form).
        allocated_weights: the weights it gave out (at most ``weight_budget``).
    """

    layers: tuple[CompressedLayer, ...]
    skipped: tuple[SkippedLayer, ...]
    model_nb_parameters_before: int
    model_nb_parameters_after: int
    seconds: float
    allocation: str = "uniform"
    allocation_seconds: float = 0.0
    weight_budget: int | None = None
    allocated_weights: int | None = None

    @property
    def nb_parameters_before(self) -> int:
        """Parameters of the replaced layers before (weights and biases)."""
        return sum(layer.nb_parameters_before for layer in self.layers)

    @property
    def nb_parameters_after(self) -> int:
        """Parameters of the replaced layers after (weights and biases)."""
        return sum(layer.nb_parameters_after for layer in self.layers)

    def __str__(self) -> str:
        names = [layer.name or "(model)" for layer in self.layers]
        width = max([len("layer"), len("total"), *(len(name) for name in names)])
        calibrated = any(layer.output_relative_error is not None for layer in self.layers)
        header = (
            f"{'layer':<{width}} {'out x in':>11} {'structure':<10} {'params before':>13} "
            f"{'params after':>12} {'share':>6} {'cost':>5} {'rel. error':>10}"
        )
        if calibrated:
            header += f" {'out error':>10}"
        lines = [header, "-" * len(header)]
        for name, layer in zip(names, self.layers, strict=True):
            shape = f"{layer.output_dim}x{layer.input_dim}"
            line = (
                f"{name:<{width}} {shape:>11} {layer.structure:<10} "
                f"{layer.nb_parameters_before:>13} {layer.nb_parameters_after:>12} "
                f"{'-' if layer.nb_params_share is None else f'{layer.nb_params_share:.3f}':>6} "
                f"{'-' if layer.cost_ratio is None else f'{layer.cost_ratio:.2f}':>5} "
                f"{format_error(layer.relative_error)}"
            )
            if calibrated:
                output = layer.output_relative_error
                line += f" {'-':>10}" if output is None else f" {format_error(output)}"
            lines.append(line)
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<{width}} {'':>11} {'':<10} {self.nb_parameters_before:>13} "
            f"{self.nb_parameters_after:>12}"
        )
        before, after = self.model_nb_parameters_before, self.model_nb_parameters_after
        lines.append(
            f"model: {before} -> {after} parameters ({after / max(before, 1):.1%}); "
            f"{len(self.layers)} layer(s) replaced in {self.seconds:.2f} s"
        )
        if self.allocation == "global":
            lines.append(
                f"global allocation: {self.allocated_weights} of {self.weight_budget} weights "
                f"given out, in {self.allocation_seconds:.2f} s"
            )
        for skipped in self.skipped:
            lines.append(
                f"kept dense: {skipped.name or '(model)'} ({skipped.output_dim}x{skipped.input_dim}): "
                f"{skipped.reason}"
            )
        return "\n".join(lines)
