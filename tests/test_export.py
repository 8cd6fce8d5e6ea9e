"""Export: every registered model, as built and after ``optimize``, through ``torch.export`` and ONNX
(``torch.onnx.export(..., dynamo=True)``), run by onnxruntime, equal to eager within 1e-4; and the dense CRF layer's
one clear ONNX error.

While exporting, the fused layers write ``deeplab_fast::atrous_conv2d`` as ``F.conv2d`` + scale + bias + ReLU and the
ASPP modules take their plain-torch path (``deeplab_fast.nn.atrous.fused_conv``), so the exported graphs hold
standard ops only (checked). Inputs are 65x65 (odd), one image, three classes: the test checks the exporters on
each architecture, not speed. onnx / onnxruntime / onnxscript are test extras; the ONNX cases skip without them.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys

import pytest
import torch

from deeplab_fast import models, optimize
from deeplab_fast.nn import DenseCRF
from deeplab_fast.nn.crf import ONNX_EXPORT_ERROR

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_matches  # noqa: E402
from helpers import randomize_ as _randomize_  # noqa: E402


def _out(y):
    return y["out"] if isinstance(y, dict) else y


def _onnx_run(ep, x):
    """The exported program through the ONNX exporter and onnxruntime: the first output (``out``)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(ep, (x,), dynamo=True, verbose=False, optimize=False)
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert not any("deeplab" in op.lower() for op in ops), ops
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("name", models.list_models())
def test_export_every_model(name):
    torch.manual_seed(0)
    model = _randomize_(models.get_model(name, num_classes=3), 1, gain=2.0, spread=0.2, var_low=0.5).eval()
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(2))
    for form, m in (("as built", model), ("optimize", optimize(model))):
        with torch.no_grad():
            eager = _out(m(x))
            ep = torch.export.export(m, (x,))
            targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
            assert not any("deeplab_fast" in t for t in targets), f"{name} {form}: {targets}"
            assert_matches(_out(ep.module()(x)), eager, 1e-5, f"{name} {form}: torch.export")
            assert_matches(_onnx_run(ep, x), eager, 1e-4, f"{name} {form}: ONNX + onnxruntime")


class _NetAndCRF(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = models.get_model("lraspp_mobilenet_v3_large", num_classes=3).eval()
        self.crf = DenseCRF.from_preset("deeplab_v2_voc", iterations=2)

    def forward(self, x, image):
        return self.crf(self.net(x)["out"], image)


def test_dense_crf_onnx_error_and_torch_export():
    model = _NetAndCRF().eval()
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(3))
    image = torch.randint(0, 256, (1, 3, 33, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    pytest.importorskip("onnxscript")
    with pytest.raises(Exception) as info, contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (x, image), dynamo=True, verbose=False)
    messages, e = [], info.value
    while e is not None:
        messages.append(str(e))
        e = e.__cause__ or e.__context__
    assert any(ONNX_EXPORT_ERROR in m for m in messages), messages[0][:500]
    assert "Export the network without the CRF layer" in ONNX_EXPORT_ERROR
    # torch.export keeps the CRF op (it runs wherever deeplab_fast is imported); the network part is standard ops
    with torch.no_grad():
        ep = torch.export.export(model, (x, image))
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert any("dense_crf" in t for t in targets) and not any("atrous_conv2d" in t for t in targets)
        assert torch.allclose(ep.module()(x, image), model(x, image), atol=1e-5)
