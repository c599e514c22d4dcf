"""Exports of a spec (and optionally trained weights): JSON spec, standalone PyTorch source,
TorchScript and ONNX.

* ``json``: the spec, indented with sorted keys (same content as the canonical form, so
  the same hash); ``fitnas arch show model.json`` reads it back.
* ``pytorch``: one ``.py`` file that needs only torch. It holds the layer classes, the
  network class and a ``build_model()`` made of explicit constructor calls; its
  ``state_dict`` keys equal those of :func:`blocks.build_model`, so weights load across
  the two. The canonical spec JSON and hash are embedded as ``SPEC_JSON`` / ``SPEC_HASH``.
  The file defines the architecture only; save weights with ``torch.save(state_dict)``.
* ``torchscript``: traced in eval mode at ``1 x C x R x R`` and frozen (BatchNorm folded,
  constants inlined); the spec JSON rides along as the extra file ``fitnas_spec.json``.
* ``onnx``: the legacy TorchScript-based exporter (opset 17, no onnxscript needed), dynamic
  batch dimension, input ``input`` and output ``logits``; checked with ``onnx.checker``;
  the spec JSON and hash are stored as metadata properties. Needs ``onnx``
  (``pip install fitnas[worker]``).
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

import blocks.layers
from blocks.builder import Network, build_model
from blocks.kinds import KINDS
from blocks.recipe import classes, render
from blocks.shapes import ResolvedBlock, feature_width, resolve
from blocks.spec import ArchSpec

Format = Literal["json", "pytorch", "torchscript", "onnx"]
FORMATS: tuple[str, ...] = ("json", "pytorch", "torchscript", "onnx")
FILE_NAMES = {
    "json": "model.json",
    "pytorch": "model.py",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
}
SPEC_FILE = "fitnas_spec.json"  # TorchScript extra file / ONNX metadata key
ONNX_OPSET = 17


class ExportError(RuntimeError):
    """An export that could not be written; the message is one line meant for a person."""


# ---- JSON --------------------------------------------------------------------------------


def spec_json(spec: ArchSpec) -> str:
    return json.dumps(spec.canonical_dict(), indent=2, sort_keys=True) + "\n"


# ---- standalone PyTorch source -----------------------------------------------------------


def _module_parts(module) -> tuple[list[str], str]:
    """(import lines, body without docstring and imports) of a module's source."""
    source = inspect.getsource(module)
    tree = ast.parse(source)
    lines = source.splitlines()
    drop: set[int] = set()
    imports: list[str] = []
    for i, node in enumerate(tree.body):
        is_doc = (i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                  and isinstance(node.value.value, str))
        if is_doc or isinstance(node, ast.Import | ast.ImportFrom):
            span = range(node.lineno - 1, node.end_lineno)
            drop.update(span)
            if not is_doc:
                text = "\n".join(lines[j] for j in span)
                if "__future__" not in text:
                    imports.append(text)
    body = "\n".join(line for j, line in enumerate(lines) if j not in drop).strip("\n")
    return imports, body


def _recipe(rb: ResolvedBlock):
    return KINDS[rb.block.kind].recipe(rb.block, rb.in_channels, rb.out_channels)


def _block_call(rb: ResolvedBlock) -> str:
    """Python source that constructs the module ``blocks.builder.build_block`` builds: the
    same recipe, written out (``norm`` is the file's BatchNorm factory)."""
    return render(_recipe(rb))


def _extra_layers(spec: ArchSpec) -> list[str]:
    """Source of the module classes the spec's blocks use that live outside
    :mod:`blocks.layers` (a block kind's own module), innermost first so that each class
    is defined before a class that names it at construction."""
    seen: list[type] = []
    for rb in resolve(spec):
        for cls in reversed(classes(_recipe(rb))):
            if cls.__module__ != blocks.layers.__name__ and cls not in seen:
                seen.append(cls)
    return [inspect.getsource(cls).rstrip() for cls in seen]


def _build_function(spec: ArchSpec) -> str:
    resolved = resolve(spec)
    out = [
        "def build_model() -> Network:",
        '    """The network described by SPEC_JSON (BatchNorm eps and every width explicit)."""',
        f"    norm = partial(nn.BatchNorm2d, eps={spec.norm_eps!r})",
        f"    stem = ConvNormAct({spec.in_channels}, {spec.stem.out_channels}, "
        f"kernel={spec.stem.kernel}, stride={spec.stem.stride}, norm_layer=norm, "
        f"act_layer=activation({spec.stem.act!r}))",
        "    stages = nn.Sequential()",
    ]
    for si in range(len(spec.stages)):
        field = f"stages[{si}].block"
        calls = [_block_call(rb) for rb in resolved if rb.field == field]
        out.append(f"    stages.add_module({str(si)!r}, nn.Sequential(")
        out += [f"        {call}," for call in calls]
        out.append("    ))")
    if spec.head is not None:
        h = spec.head
        out.append(f"    head = ConvNormAct({resolved[-1].out_channels}, {h.out_channels}, "
                   f"kernel={h.kernel}, stride={h.stride}, norm_layer=norm, "
                   f"act_layer=activation({h.act!r}))")
    else:
        out.append("    head = nn.Identity()")
    width = feature_width(spec, resolved)
    clf = spec.classifier
    layers = []
    if clf.hidden is not None:
        layers += [f"nn.Linear({width}, {clf.hidden})", f"activation({clf.hidden_act!r})()"]
        width = clf.hidden
    if clf.dropout > 0:
        layers.append(f"nn.Dropout({clf.dropout!r})")
    layers.append(f"nn.Linear({width}, {spec.num_classes}, bias={clf.bias!r})")
    out.append("    classifier = nn.Sequential(")
    out += [f"        {layer}," for layer in layers]
    out.append("    )")
    out.append(f"    return Network(stem, stages, head, classifier, stem_pool={spec.stem_pool!r})")
    return "\n".join(out)


def pytorch_source(spec: ArchSpec) -> str:
    """The standalone module's source (needs only torch)."""
    layer_imports, layer_body = _module_parts(blocks.layers)
    extra = "".join(f"\n\n\n{src}" for src in _extra_layers(spec))
    network = inspect.getsource(Network)
    imports = ["import json", *layer_imports]
    if "import torch" not in imports:
        imports.append("import torch")
    canonical = spec.canonical_json()
    title = json.dumps(spec.name or "fitnas network")
    res = spec.resolution
    return "\n".join([
        f'"""Standalone PyTorch definition of {title[1:-1]}.',
        "",
        "Generated by fitnas from an architecture spec; needs only torch. `build_model()`",
        "returns the network; its state_dict keys match fitnas's builder, so weights saved",
        "from either load into the other. SPEC_JSON is the canonical spec, SPEC_HASH its",
        "content hash.",
        "",
        "    python model.py    # builds the network and runs one input through it",
        "",
        "Latency: fitnas measured this network with glibc's allocator thresholds fixed,",
        "    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824",
        "in the environment of the process (eval(), BatchNorm folded, fixed threads). Set",
        "the same in the deployed process to see the measured figure; with glibc's dynamic",
        "thresholds a fresh process can run 1.5-3x slower until they settle (fitnas's",
        "docs/measurement.md, 'Allocator').",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        *imports,
        "",
        f"SPEC_HASH = {spec.hash!r}",
        f"SPEC_JSON = {canonical!r}",
        f"INPUT_SHAPE = (1, {spec.in_channels}, {res}, {res})",
        "",
        "",
        "def spec() -> dict:",
        "    return json.loads(SPEC_JSON)",
        "",
        "",
        "# ---- layers " + "-" * 80,
        "",
        layer_body + extra,
        "",
        "",
        "# ---- network " + "-" * 79,
        "",
        "",
        network.rstrip(),
        "",
        "",
        _build_function(spec),
        "",
        "",
        'if __name__ == "__main__":',
        "    model = build_model().eval()",
        "    with torch.no_grad():",
        "        logits = model(torch.randn(*INPUT_SHAPE))",
        "    params = sum(p.numel() for p in model.parameters())",
        '    print(f"params={params} output={tuple(logits.shape)} hash={SPEC_HASH[:12]}")',
        "",
    ])


# ---- traced formats ----------------------------------------------------------------------


def _prepare(spec: ArchSpec, model: nn.Module | None, resolution: int | None):
    res = spec.resolution if resolution is None else resolution
    model = build_model(spec) if model is None else model
    was_training = model.training
    model.eval()
    example = torch.randn(1, spec.in_channels, res, res,
                          dtype=next(model.parameters()).dtype,
                          device=next(model.parameters()).device)
    return model, example, was_training


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def torchscript_module(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``model`` (in eval mode) traced on ``example`` and frozen: BatchNorm folded, constants
    inlined. The one TorchScript path, shared by the export and the latency evaluator;
    raises :class:`ExportError` with a one-line reason."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (example,), check_trace=False)
            return torch.jit.freeze(traced.eval())
    except Exception as exc:
        raise ExportError(f"TorchScript trace/freeze failed: {_first_line(exc)}") from exc


def onnx_bytes(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> bytes:
    """``model`` (in eval mode) as an ONNX graph, in memory: the legacy TorchScript-based
    exporter at opset :data:`ONNX_OPSET`, input ``input``, output ``logits``, the batch
    dimension dynamic when ``dynamic_batch``. The one ONNX path, shared by the export and
    the latency evaluator; raises :class:`ExportError` with a one-line reason."""
    buf = io.BytesIO()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), buf, dynamo=False, opset_version=ONNX_OPSET,
                input_names=["input"], output_names=["logits"], dynamic_axes=axes,
                do_constant_folding=True,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    return buf.getvalue()


def _torchscript(spec: ArchSpec, path: Path, model: nn.Module | None,
                 resolution: int | None) -> None:
    model, example, was_training = _prepare(spec, model, resolution)
    try:
        frozen = torchscript_module(model, example)
    finally:
        model.train(was_training)
    torch.jit.save(frozen, str(path), _extra_files={SPEC_FILE: spec.canonical_json()})


def _onnx(spec: ArchSpec, path: Path, model: nn.Module | None, resolution: int | None) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("ONNX export needs the 'onnx' package "
                          "(pip install 'fitnas[worker]')") from exc
    model, example, was_training = _prepare(spec, model, resolution)
    try:
        data = onnx_bytes(model, example)
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(data)
    proto.producer_name = "fitnas"
    for key, value in ((SPEC_FILE, spec.canonical_json()), ("fitnas_spec_hash", spec.hash)):
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    if spec.name:
        proto.doc_string = spec.name
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


# ---- entry points ------------------------------------------------------------------------


def export(spec: ArchSpec, fmt: Format, path: str | Path, model: nn.Module | None = None,
           resolution: int | None = None) -> Path:
    """Write ``spec`` (with ``model``'s weights where the format holds weights: TorchScript,
    ONNX; a freshly initialized model otherwise) as ``fmt`` to ``path``; return the path.

    Raises :class:`ExportError` with a one-line message for an unknown format or a path
    that cannot be written, and :class:`blocks.shapes.SpecError` for a spec that cannot be
    built."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    resolve(spec)  # structural errors first, naming the field
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "json":
            path.write_text(spec_json(spec))
        elif fmt == "pytorch":
            path.write_text(pytorch_source(spec))
        elif fmt == "torchscript":
            _torchscript(spec, path, model, resolution)
        else:
            _onnx(spec, path, model, resolution)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ExportError(f"cannot write {path}: {reason}") from exc
    except RuntimeError as exc:
        if isinstance(exc, ExportError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{fmt} export failed: {first}") from exc
    return path


def export_all(spec: ArchSpec, out_dir: str | Path,
               model: nn.Module | None = None) -> dict[str, Path]:
    """Every format into ``out_dir`` (``model.json``, ``model.py``,
    ``model.torchscript.pt``, ``model.onnx``); one model is built and shared when none is
    given, so TorchScript and ONNX hold the same weights."""
    out_dir = Path(out_dir)
    model = build_model(spec) if model is None else model
    return {fmt: export(spec, fmt, out_dir / FILE_NAMES[fmt], model=model) for fmt in FORMATS}


__all__ = [
    "FILE_NAMES",
    "FORMATS",
    "ONNX_OPSET",
    "ExportError",
    "export",
    "export_all",
    "onnx_bytes",
    "pytorch_source",
    "spec_json",
    "torchscript_module",
]
