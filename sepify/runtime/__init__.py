"""Where models run outside eager PyTorch, and how their time is measured.

One module per job, so that adding a runtime touches this subpackage and :class:`sepify.vocab.Backend` only:

* :mod:`~sepify.runtime.export`: the one place that calls ``torch.onnx.export``, ``torch.export.export`` and
  ``openvino.convert_model`` (a dynamic batch axis where the model allows it).
* :mod:`~sepify.runtime.sessions`: the one place that builds onnxruntime sessions and compiles OpenVINO models,
  and says which runtimes are installed.
* :mod:`~sepify.runtime.layers`: one layer (a conv or a pair) as a small ONNX graph, with the neighbours a runtime
  fuses with it (:mod:`~sepify.runtime.context`).
* :mod:`~sepify.runtime.runners`: a layer or a whole model prepared in a backend, ready to time.
* :mod:`~sepify.runtime.timing`: interleaved medians, and a pair timed against its conv in every layout.
* :mod:`~sepify.runtime.check`: a written deployment file run back in its runtime and compared with PyTorch.
"""
