"""The Resize rewrite on tiny graphs built here and on the real u2netp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from imgsvc.models.background.onnx_resize import constant_resize_model, largest_difference


def _graph_resized_like(tmp_path: Path, repeats: int, keep: int, batch: int | str = 1) -> Path:
    """x (1x1x4x4) upsampled (linear, pytorch_half_pixel) to the size of a tensor computed from
    x itself (tiled `repeats` times, then cut to `keep` pixels): sizes known only at run time."""
    nodes = [
        helper.make_node("Tile", ["x", "repeats"], ["tiled"]),
        helper.make_node("Slice", ["tiled", "starts", "ends", "axes"], ["like"]),
        helper.make_node("Shape", ["like"], ["sizes"]),
        helper.make_node(
            "Resize",
            ["x", "", "", "sizes"],
            ["up"],
            mode="linear",
            coordinate_transformation_mode="pytorch_half_pixel",
        ),
        helper.make_node("Add", ["up", "like"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 1, repeats, repeats], np.int64), "repeats"),
        numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
        numpy_helper.from_array(np.array([keep, keep], np.int64), "ends"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
    ]
    graph = helper.make_graph(
        nodes,
        "resized_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def _session(model: Path | bytes) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def test_integer_upsample_gets_constant_scales_and_the_same_output(tmp_path: Path) -> None:
    path = _graph_resized_like(tmp_path, repeats=2, keep=8)
    rewritten = constant_resize_model(path)
    assert rewritten is not None
    data, changed = rewritten
    assert changed == 1
    model = onnx.load_from_string(data)
    assert [n.op_type for n in model.graph.node] == ["Tile", "Slice", "Resize", "Add"]  # no Shape
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    scales = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[resize.input[2]]
    assert scales.tolist() == [1.0, 1.0, 2.0, 2.0]
    assert largest_difference(_session(path), _session(data)) < 1e-6


def test_fractional_ratio_or_dynamic_input_is_left_alone(tmp_path: Path) -> None:
    assert constant_resize_model(_graph_resized_like(tmp_path, repeats=2, keep=6)) is None  # 1.5x
    assert constant_resize_model(_graph_resized_like(tmp_path, 2, 8, batch="n")) is None


def test_u2netp_rewrite_keeps_its_outputs(repo_weights: Path) -> None:
    path = repo_weights / "rembg" / "u2netp.onnx"
    rewritten = constant_resize_model(path)
    assert rewritten is not None
    data, changed = rewritten
    assert changed == 38  # every upsample in u2netp's decoder and side outputs
    model = onnx.load_from_string(data)
    assert not [n for n in model.graph.node if n.op_type == "Shape"]
    assert largest_difference(_session(path), _session(data)) < 1e-5


def test_not_an_onnx_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an ONNX model"):
        constant_resize_model(path)
