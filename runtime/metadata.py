"""The metadata keys onnxgrad writes into ONNX graphs, defined once for every layer.

``runtime`` is the bottom layer, so the passes that write these keys (``passes.builder``), the
tracer that records them and the inspection that reads them all import them from here.
"""
from __future__ import annotations

# Node metadata_props.
ORIGIN = "onnxgrad.origin"  # which stage made the node: one of ORIGINS
SOURCE = "onnxgrad.source"  # the user's source line for traced nodes: "model.py:12: y = conv(x)"
MODULE = "onnxgrad.module"  # the qualified module path the node was recorded in: "layer1.0.conv1"

# Model (or graph) metadata_props, as JSON.
STATE = "onnxgrad.state"  # object: state output name -> the input it feeds on the next step
DATA_INPUTS = "onnxgrad.data_inputs"  # list: names of the inputs fed with fresh data every step
PARAMETERS = "onnxgrad.parameters"  # list: inputs that are trainable parameters (not state)
# The portable export only: the safetensors file beside the model (a name relative to the model's
# folder) holding the first step's value of every input other than the data.
STATE_FILE = "onnxgrad.state_file"
# A data-parallel step's two files (tracer/split.py): object with the gradient buckets to
# all-reduce between them (names, dtype, the parameters' offsets and shapes) and the file names.
ALLREDUCE = "onnxgrad.allreduce"

ORIGINS = ("fwd", "grad", "opt", "bn-stats")
UNKNOWN_ORIGIN = "unknown"  # nodes without ORIGIN: any model onnxgrad did not make
