"""QDQ ONNX export of a calibrated prepared graph (``export``) and the ONNX graph edits it needs (``graph_edit``)."""

from __future__ import annotations

from qdiff_ao.deploy.onnx.export import OnnxExportReport, export_onnx, to_fake_quant_graph

__all__ = ["OnnxExportReport", "export_onnx", "to_fake_quant_graph"]
