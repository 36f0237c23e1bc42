"""export.compress: zeros pay on disk, the archive round-trips and onnxruntime loads it."""

from __future__ import annotations

import lzma

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pqd.onnx_export import compress_artifact


def int8_conv_model(path, sparsity: float, seed: int = 0) -> None:
    """A QDQ conv (int8 weight 256x256x3x3 behind DequantizeLinear) with given sparsity."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, size=(256, 256, 3, 3), dtype=np.int8)
    w[rng.random(w.shape) < sparsity] = 0
    inits = [
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.full(256, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(256, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(path))


def test_sparse_int8_compresses_far_better_than_dense(tmp_path) -> None:
    sparse, dense = tmp_path / "sparse.onnx", tmp_path / "dense.onnx"
    int8_conv_model(sparse, 0.9)
    int8_conv_model(dense, 0.0)
    s, d = compress_artifact(sparse, preset=6), compress_artifact(dense, preset=6)
    assert s["compression_ratio"] > 2.5 and d["compression_ratio"] < 1.2
    assert s["compressed_size_bytes"] < 0.4 * d["compressed_size_bytes"]
    packed = (tmp_path / s["compressed_path"]).read_bytes()
    assert len(packed) == s["compressed_size_bytes"]
    assert lzma.decompress(packed) == sparse.read_bytes()
