"""Give an ONNX graph's Resize nodes constant scales where its input shape is fixed.

U²-Net-family graphs (rembg's u2netp, u2net, …) were exported with every upsample sized "like"
another tensor: `Shape → Gather → … → Concat → Resize(sizes=…)`, computed on each run. With a
fixed input size those sizes never change, but onnxruntime cannot see that, so it keeps every
Resize (and the Concat after it) in plain NCHW layout and converts the activations to and from
its blocked NCHWc layout around each one. With the exact integer scales as constants, its
NCHWc transformer keeps the whole decoder blocked: u2netp runs faster (BENCHMARKS.md) with
outputs equal to within float rounding (the load-time check below compares the two graphs;
`tests/test_cutout.py` compares masks with rembg's own session).

Only Resize nodes whose output is an exact integer multiple of their input in every axis are
rewritten (then `half_pixel` and `pytorch_half_pixel` sample the same points, and size and
scale give the same output size); the rest of the graph is untouched, and the shape arithmetic
that fed the rewritten nodes is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_EMPTY_ROI = "imgsvc_empty_roi"


def constant_resize_model(path: Path) -> tuple[bytes, int] | None:
    """The model at `path` with constant Resize scales, and how many nodes changed.

    None when there is nothing to gain: a dynamic input shape, or no Resize to rewrite.
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except DecodeError as exc:
        raise ValueError(f"{path.name} is not an ONNX model: {exc}") from exc
    graph = model.graph
    shape = _static_input_shape(graph)
    if shape is None:
        return None
    resizes = [n for n in graph.node if n.op_type == "Resize" and _sized_at_run_time(n, graph)]
    if not resizes:
        return None
    shapes = _tensor_shapes(model, shape, [t for n in resizes for t in (n.input[0], n.output[0])])
    changed = 0
    for node in resizes:
        scales = _integer_scales(shapes[node.input[0]], shapes[node.output[0]])
        if scales is None:
            continue
        name = f"imgsvc_scales_{node.output[0]}"
        graph.initializer.append(numpy_helper.from_array(scales, name))
        data = node.input[0]
        node.ClearField("input")
        node.input.extend([data, _EMPTY_ROI, name])
        for attr in node.attribute:
            if attr.name == "coordinate_transformation_mode" and attr.s == b"pytorch_half_pixel":
                attr.s = b"half_pixel"  # the same sampling unless an axis shrinks to 1 pixel
        changed += 1
    if not changed:
        return None
    graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), _EMPTY_ROI))
    _drop_dead_code(graph)
    return model.SerializeToString(), changed


def largest_difference(original: Any, rewritten: Any) -> float:
    """Largest difference of the first output of two ORT sessions on one fixed random input."""
    feed_spec = original.get_inputs()[0]
    x = np.random.default_rng(0).random(feed_spec.shape, dtype=np.float32)
    a = original.run(None, {feed_spec.name: x})[0]
    b = rewritten.run(None, {rewritten.get_inputs()[0].name: x})[0]
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max())


def _static_input_shape(graph: Any) -> list[int] | None:
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in _dims(inputs[0])]
    return dims if dims and all(d > 0 for d in dims) else None


def _dims(value_info: Any) -> Any:
    return value_info.type.tensor_type.shape.dim


def _sized_at_run_time(node: Any, graph: Any) -> bool:
    """A Resize whose `sizes` (4th input) is computed, not an initializer."""
    constants = {i.name for i in graph.initializer}
    return len(node.input) >= 4 and bool(node.input[3]) and node.input[3] not in constants


def _tensor_shapes(model: Any, input_shape: list[int], names: list[str]) -> dict[str, list[int]]:
    """Run the graph once on zeros with `names` exposed as outputs, and read their shapes."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(names):
        if name not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed_name = session.get_inputs()[0].name
    values = session.run(None, {feed_name: np.zeros(input_shape, np.float32)})
    return {o.name: list(v.shape) for o, v in zip(session.get_outputs(), values, strict=True)}


def _integer_scales(before: list[int], after: list[int]) -> np.ndarray | None:
    """after / before per axis when every one is a whole number (>= 1), else None."""
    if len(before) != len(after) or any(
        b <= 0 or a % b for b, a in zip(before, after, strict=True)
    ):
        return None
    return np.array([a // b for b, a in zip(before, after, strict=True)], dtype=np.float32)


def _drop_dead_code(graph: Any) -> None:
    """Remove nodes (and initializers) that no graph output depends on any more."""
    producers = {out: node for node in graph.node for out in node.output}
    needed: set[str] = set()
    stack = [o.name for o in graph.output]
    live: set[int] = set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producers.get(name)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(i for i in node.input if i)
    kept = [n for n in graph.node if id(n) in live]
    graph.ClearField("node")
    graph.node.extend(kept)
    used = [i for i in graph.initializer if i.name in needed]
    graph.ClearField("initializer")
    graph.initializer.extend(used)
