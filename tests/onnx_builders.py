"""Small CNN image classifiers built with ``onnx.helper`` in the shapes real exporters produce.

Other tests use these graphs to check that onnx-sp2ps finds the image input, the feature map
(the tensor the classifier head consumes: the last tensor with spatial extent > 1 on the path
to the logits) and the logits (the input of a final Softmax/LogSoftmax/Sigmoid, else the
output). Every builder call runs ``onnx.checker.check_model(model, full_check=True)``.

The graph is ``trunk -> head [-> Mul(temperature)] [-> final] [-> tail]``.

Trunk
    Three 3x3 convolutions (pads 1; strides 1, 2, 2; channels ``width``, ``2 width``,
    ``2 width``), each followed by Relu or HardSwish, so a 32x32 image gives an 8x8 feature
    map with ``2 width`` channels (in general ``ceil(size / 4)``). With ``layout="NHWC"`` the
    image input is (N, H, W, C) and every Conv sits between ``Transpose(perm [0,3,1,2])`` and
    ``Transpose(perm [0,2,3,1])`` (tf2onnx style), so the activations between convs are NHWC.

Heads (``head``) and the expected feature map
    ============================ =====================================================
    ``gap_gemm``                 GlobalAveragePool -> Flatten -> Gemm(transB=1)
    ``reducemean_matmul``        ReduceMean(spatial axes, keepdims=0) -> MatMul -> Add
    ``reducemean_keepdims``      ReduceMean(keepdims=1) -> Squeeze (NCHW) or
                                 Reshape [-1, C] (NHWC) -> MatMul -> Add
    ``flatten_mlp``              Flatten -> Gemm -> Relu -> Gemm
    ``conv1x1_gap``              Conv 1x1 (num_classes out) -> Relu -> GlobalAveragePool
                                 -> Flatten (NCHW); NHWC: Transpose -> Conv -> Transpose
                                 -> Relu -> ReduceMean [1, 2]
    ``gap_reshape_matmul``       GlobalAveragePool -> Reshape [-1, C] -> MatMul -> Add
    ``avgpool_flatten_gemm``     AveragePool(kernel = full h x w) -> Flatten -> Gemm
    ============================ =====================================================

    The expected feature map is the tensor the first head op consumes. For NCHW models that
    is the last trunk activation. For NHWC models, the heads that need NCHW (``gap_gemm``,
    ``conv1x1_gap``, ``gap_reshape_matmul``, ``avgpool_flatten_gemm``) start with a
    ``Transpose(perm [0,3,1,2])``; that Transpose counts as trunk, and the expected feature
    map is its NCHW *output* (``feature_layout="NCHW"``): it is the last tensor with spatial
    extent > 1 before pooling. The ReduceMean and Flatten heads consume the NHWC activation
    directly (``feature_layout="NHWC"``). For ``conv1x1_gap`` the feature map is the input of
    the 1x1 classifier conv, not the class-score map after it.

Logits
    The head output (times ``temperature`` with ``extra_input=True``). ``final`` appends
    Softmax / LogSoftmax (axis 1 in PyTorch-style graphs, -1 otherwise) or Sigmoid. ``tail``
    appends shape-only ops after that: ``Identity``, ``Flatten`` (axis 1), ``Reshape``
    (to [-1, K], or to [-1, K, 1, 1] when the next non-Identity op is ``Squeeze``) and
    ``Squeeze`` (axes [2, 3]; only valid after such a Reshape). The graph output is always
    (N, K). With ``final=None`` and a tail, the expected logits are the tensor *before* the
    tail (the output is a shape-only copy of it).

Names follow one exporter per model: PyTorch (``/layer2/layer2.0/act/Relu_output_0``,
``conv1.weight``) for NCHW, tf2onnx (``StatefulPartitionedCall/model/conv2d_2/Relu:0``)
for NHWC, paddle2onnx (``relu_2.tmp_0``, ``linear_0.w_0``) for ``gap_reshape_matmul`` and for
NCHW models with ``weights="constant"``. ``weights="constant"`` turns every weight, bias,
shape and axes tensor into a Constant node output (no initializers at all).

Spatial sizes: ``symbolic=True`` names H and W ``"H"``/``"W"`` in the graph input, but the
``flatten_mlp`` and ``avgpool_flatten_gemm`` heads still bake the built ``size`` into their
weights / kernel, as real exports do; the other heads run at any size >= 5.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEADS = (
    "gap_gemm",
    "reducemean_matmul",
    "reducemean_keepdims",
    "flatten_mlp",
    "conv1x1_gap",
    "gap_reshape_matmul",
    "avgpool_flatten_gemm",
)
LAYOUTS = ("NCHW", "NHWC")
WEIGHTS = ("initializer", "constant")
FINALS = (None, "Softmax", "LogSoftmax", "Sigmoid")
TAIL_OPS = ("Identity", "Flatten", "Reshape", "Squeeze")
ACTS = ("relu", "hardswish")

_TF_PREFIX = "StatefulPartitionedCall/model"
_TO_NCHW = [0, 3, 1, 2]
_TO_NHWC = [0, 2, 3, 1]


@dataclass(frozen=True)
class BuiltModel:
    """A built classifier and what detection should find in it.

    ``feature_shape`` is the expected feature-map shape for an input of ``input_shape``;
    ``extra_inputs`` holds ``(name, value)`` for every graph input besides the image
    (``temperature`` with ``extra_input=True``); ``feeds`` assembles a full feed dict.
    """

    model: onnx.ModelProto
    input_name: str
    layout: str
    feature_map: str
    feature_layout: str
    logits: str
    activation: str | None
    num_classes: int
    input_shape: tuple
    feature_shape: tuple = ()
    extra_inputs: tuple = ()
    head: str = ""

    @property
    def output_name(self) -> str:
        return self.model.graph.output[0].name

    def random_input(self, seed: int = 0, batch: int | None = None) -> np.ndarray:
        """A standard-normal float32 image batch of ``input_shape`` (batch size overridable)."""
        shape = self.input_shape if batch is None else (batch, *self.input_shape[1:])
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    def feeds(self, images: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Feed dict for ``InferenceSession.run``: the images plus every extra input."""
        images = self.random_input() if images is None else images
        return {self.input_name: images, **{name: value for name, value in self.extra_inputs}}


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` with the tensors ``names`` added as graph outputs.

    Each added output keeps its inferred type and shape (strict shape inference); a name that
    is already an output is left alone. ``model`` is not modified.
    """
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    known = {vi.name: vi for vi in inferred.graph.value_info}
    present = {out.name for out in edited.graph.output}
    missing = [name for name in names if name not in known and name not in present]
    if missing:
        raise KeyError(f"tensors without an inferred type in the graph: {missing}")
    for name in names:
        if name not in present:
            edited.graph.output.append(known[name])
            present.add(name)
    return edited


def with_input_dtype(model: onnx.ModelProto, elem_type: int) -> onnx.ModelProto:
    """A copy of ``model`` whose image input (the first) is of ``elem_type``, cast to float
    first thing (the form of edge exports that take uint8 pixels)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inp = out.graph.input[0]
    inp.type.tensor_type.elem_type = elem_type
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name == inp.name:
                node.input[i] = "pixels_as_float"
    out.graph.node.insert(
        0, helper.make_node("Cast", [inp.name], ["pixels_as_float"], to=TensorProto.FLOAT)
    )
    onnx.checker.check_model(out)
    return out


def run_model(
    built: BuiltModel, images: np.ndarray | None = None, outputs=()
) -> dict[str, np.ndarray]:
    """Run ``built`` on CPU with ONNX Runtime; returns ``{name: array}`` for the graph output
    and for every tensor in ``outputs`` (added as graph outputs on a copy)."""
    import onnxruntime as ort

    model = with_outputs(built.model, outputs) if outputs else built.model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(names, built.feeds(images))))


def _exporter_style(head: str, layout: str, weights: str) -> str:
    if layout == "NHWC":
        return "tf"
    if head == "gap_reshape_matmul" or weights == "constant":
        return "paddle"
    return "torch"


class _GraphWriter:
    """Collects nodes and parameters, naming them the way one exporter does."""

    def __init__(self, style: str, weights: str, opset: int, rng: np.random.Generator):
        self.style = style
        self.weights = weights
        self.opset = opset
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._node_names: Counter = Counter()
        self._scope_outputs: Counter = Counter()
        self._op_counts: Counter = Counter()
        self._consts = 0

    # -- names ---------------------------------------------------------------------------
    def _unique(self, base: str, sep: str) -> str:
        count = self._node_names[base]
        self._node_names[base] += 1
        return base if count == 0 else f"{base}{sep}{count}"

    def _names(self, op_type: str, scope: str) -> tuple[str, str]:
        if self.style == "torch":
            # torch.onnx scopes: one level per module, Sequential indices keep their parent
            # ("layer2.0.act" -> "/layer2/layer2.0/act").
            levels: list[str] = []
            for part in scope.split(".") if scope else []:
                levels.append(f"{levels[-1]}.{part}" if part.isdigit() and levels else part)
            path = "".join("/" + level for level in levels)
            node = self._unique(f"{path}/{op_type}", "_")
            return node, f"{node}_output_0"
        if self.style == "tf":
            node = self._unique(
                f"{_TF_PREFIX}/{scope}/{op_type}" if scope else f"{_TF_PREFIX}/{op_type}", "__"
            )
            return node, f"{node}:0"
        index = self._op_counts[op_type]
        self._op_counts[op_type] += 1
        tmp = self._scope_outputs[scope]
        self._scope_outputs[scope] += 1
        return f"p2o.{op_type}.{index}", f"{scope}.tmp_{tmp}"

    def _param_name(self, scope: str, kind: str) -> str:
        if kind == "const":
            self._consts += 1
            return {
                "torch": f"onnx::{scope}_{100 + self._consts}",
                "tf": f"const_fold_opt__{100 + self._consts}",
                "paddle": f"p2o.helper.constant.{self._consts}",
            }[self.style]
        if self.style == "torch":
            return f"{scope}.{kind}"
        if self.style == "tf":
            op = "BiasAdd" if kind == "bias" else "Conv2D" if scope.startswith("conv") else "MatMul"
            return f"{_TF_PREFIX}/{scope}/{op}/ReadVariableOp:0"
        return f"{scope}.{'w_0' if kind == 'weight' else 'b_0'}"

    # -- graph pieces --------------------------------------------------------------------
    def param(self, scope: str, kind: str, value: np.ndarray) -> str:
        """A weight / bias / constant ("const" kind, scope = consumer op) as an initializer or
        as a Constant node output, by ``weights``."""
        name = self._param_name(scope, kind)
        tensor = numpy_helper.from_array(value, name)
        if self.weights == "initializer":
            self.initializers.append(tensor)
        else:
            node = self._unique(f"Constant_{name.replace('/', '_').replace(':', '_')}", "_")
            self.nodes.append(helper.make_node("Constant", [], [name], name=node, value=tensor))
        return name

    def ints(self, scope: str, values) -> str:
        return self.param(scope, "const", np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs, scope: str = "", **attrs) -> str:
        node, out = self._names(op_type, scope)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node, **attrs))
        return out

    def reduce_mean(self, x: str, axes, keepdims: int, scope: str) -> str:
        if self.opset >= 18:
            return self.op(
                "ReduceMean", [x, self.ints("ReduceMean", axes)], scope, keepdims=keepdims
            )
        return self.op("ReduceMean", [x], scope, axes=list(axes), keepdims=keepdims)

    def he(self, shape, fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def small(self, shape) -> np.ndarray:
        return (0.05 * self.rng.standard_normal(shape)).astype(np.float32)


def _classifier_weight(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """(fan_in, fan_out) weights with zero-mean columns, scaled 3 / sqrt(fan_in).

    ReLU features share a large positive mean; zero-mean columns cancel it, so the logits
    depend on the image (top-1 varies across random images) and stay O(1).
    """
    weight = rng.standard_normal((fan_in, fan_out))
    weight -= weight.mean(axis=0, keepdims=True)
    return (weight * (3.0 / np.sqrt(fan_in))).astype(np.float32)


def _validate(
    head, layout, weights, final, tail, channels, size, num_classes, width, fixed_batch, opset, act
):
    def choice(name, value, allowed):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: choose one of {allowed}")

    choice("head", head, HEADS)
    choice("layout", layout, LAYOUTS)
    choice("weights", weights, WEIGHTS)
    choice("final", final, FINALS)
    choice("act", act, ACTS)
    for op in tail:
        choice("tail op", op, TAIL_OPS)
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: use 1 or 3")
    if size < 5:
        raise ValueError(f"size={size}: use at least 5 so the feature map keeps spatial extent > 1")
    if num_classes < 2 or width < 1:
        raise ValueError(
            f"num_classes={num_classes}, width={width}: use num_classes >= 2, width >= 1"
        )
    if fixed_batch is not None and fixed_batch < 1:
        raise ValueError(f"fixed_batch={fixed_batch}: use None or a positive batch size")
    if opset < 13:
        raise ValueError(f"opset={opset}: use 13 or later (Squeeze takes axes as an input)")
    if act == "hardswish" and opset < 14:
        raise ValueError(f"act='hardswish' needs opset >= 14, got opset={opset}")


def build_cnn(
    *,
    head: str = "gap_gemm",
    layout: str = "NCHW",
    weights: str = "initializer",
    symbolic: bool = False,
    final: str | None = None,
    tail: tuple[str, ...] = (),
    channels: int = 3,
    size: int = 32,
    num_classes: int = 5,
    width: int = 8,
    fixed_batch: int | None = None,
    opset: int = 17,
    extra_input: bool = False,
    seed: int = 0,
    act: str = "relu",
) -> BuiltModel:
    """Build one small CNN classifier; see the module docstring for the graph forms."""
    tail = tuple(tail)
    _validate(
        head,
        layout,
        weights,
        final,
        tail,
        channels,
        size,
        num_classes,
        width,
        fixed_batch,
        opset,
        act,
    )
    style = _exporter_style(head, layout, weights)
    g = _GraphWriter(style, weights, opset, np.random.default_rng(seed))
    nhwc = layout == "NHWC"

    input_name = {"torch": "input", "tf": "input_1", "paddle": "x"}[style]
    batch_dim = fixed_batch if fixed_batch is not None else "N"
    h_dim, w_dim = ("H", "W") if symbolic else (size, size)
    input_dims = (
        [batch_dim, h_dim, w_dim, channels] if nhwc else [batch_dim, channels, h_dim, w_dim]
    )
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_dims)]

    # ---- trunk ----------------------------------------------------------------------------
    act_op = "Relu" if act == "relu" else "HardSwish"
    x, c_in, spatial = input_name, channels, size
    for i, (c_out, stride) in enumerate([(width, 1), (2 * width, 2), (2 * width, 2)]):
        conv_scope = {
            "torch": "conv1" if i == 0 else f"layer{i}.0.conv",
            "tf": "conv2d" if i == 0 else f"conv2d_{i}",
            "paddle": f"conv2d_{i}",
        }[style]
        act_scope = {
            "torch": "act1" if i == 0 else f"layer{i}.0.act",
            "tf": conv_scope,
            "paddle": f"{act_op.lower()}_{i}",
        }[style]
        w = g.param(conv_scope, "weight", g.he((c_out, c_in, 3, 3), c_in * 9))
        b = g.param(conv_scope, "bias", g.small((c_out,)))
        if nhwc:
            x = g.op("Transpose", [x], conv_scope, perm=_TO_NCHW)
        x = g.op(
            "Conv",
            [x, w, b],
            conv_scope,
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[stride, stride],
        )
        if nhwc:
            x = g.op("Transpose", [x], conv_scope, perm=_TO_NHWC)
        x = g.op(act_op, [x], act_scope)
        c_in, spatial = c_out, (spatial - 1) // stride + 1
    feature_channels = c_in

    def pick(torch: str, tf: str, paddle: str) -> str:
        return {"torch": torch, "tf": tf, "paddle": paddle}[style]

    def to_nchw(t: str) -> str:
        return (
            g.op(
                "Transpose", [t], pick("", "global_average_pooling2d", "transpose_0"), perm=_TO_NCHW
            )
            if nhwc
            else t
        )

    def linear(t: str, fan_in: int, fan_out: int, scope: str, form: str) -> str:
        """Gemm(transB=1) / Gemm / MatMul + Add (weight (fan_in, fan_out) before transB)."""
        weight = _classifier_weight(g.rng, fan_in, fan_out)
        if form == "gemm_t":
            return g.op(
                "Gemm",
                [
                    t,
                    g.param(scope, "weight", weight.T.copy()),
                    g.param(scope, "bias", g.small((fan_out,))),
                ],
                scope,
                transB=1,
            )
        if form == "gemm":
            return g.op(
                "Gemm",
                [t, g.param(scope, "weight", weight), g.param(scope, "bias", g.small((fan_out,)))],
                scope,
            )
        t = g.op("MatMul", [t, g.param(scope, "weight", weight)], scope)
        return g.op("Add", [t, g.param(scope, "bias", g.small((fan_out,)))], scope)

    # ---- head -----------------------------------------------------------------------------
    fc = pick("fc", "dense", "linear_0")
    feature_layout = layout
    if head in ("gap_gemm", "gap_reshape_matmul", "avgpool_flatten_gemm"):
        x = feature_map = to_nchw(x)
        feature_layout = "NCHW"
        if head == "avgpool_flatten_gemm":
            x = g.op(
                "AveragePool",
                [x],
                pick("avgpool", "average_pooling2d", "pool2d_0"),
                kernel_shape=[spatial, spatial],
            )
        else:
            x = g.op(
                "GlobalAveragePool", [x], pick("avgpool", "global_average_pooling2d", "pool2d_0")
            )
        if head == "gap_reshape_matmul":
            x = g.op(
                "Reshape",
                [x, g.ints("Reshape", [-1, feature_channels])],
                pick("", "flatten", "reshape2_0"),
            )
            x = linear(x, feature_channels, num_classes, fc, "matmul")
        else:
            x = g.op("Flatten", [x], pick("", "flatten", "flatten_0"), axis=1)
            x = linear(x, feature_channels, num_classes, fc, "gemm_t")
    elif head in ("reducemean_matmul", "reducemean_keepdims"):
        feature_map = x
        axes = [1, 2] if nhwc else [2, 3]
        pool = pick("", "global_average_pooling2d", "mean_0")
        if head == "reducemean_matmul":
            x = g.reduce_mean(x, axes, 0, pool)
        else:
            x = g.reduce_mean(x, axes, 1, pool)
            if nhwc:
                x = g.op(
                    "Reshape",
                    [x, g.ints("Reshape", [-1, feature_channels])],
                    pick("", "flatten", "reshape2_0"),
                )
            else:
                x = g.op("Squeeze", [x, g.ints("Squeeze", axes)], pick("", "flatten", "squeeze_0"))
        x = linear(x, feature_channels, num_classes, fc, "matmul")
    elif head == "flatten_mlp":
        feature_map = x
        flat = feature_channels * spatial * spatial
        hidden = 4 * width
        gemm_form = "gemm_t" if style == "torch" else "gemm"
        x = g.op("Flatten", [x], pick("", "flatten", "flatten_0"), axis=1)
        x = linear(x, flat, hidden, pick("classifier.0", "dense", "linear_0"), gemm_form)
        x = g.op("Relu", [x], pick("classifier.1", "dense", "relu_3"))
        x = linear(x, hidden, num_classes, pick("classifier.2", "dense_1", "linear_1"), gemm_form)
    else:  # conv1x1_gap
        x = feature_map = to_nchw(x)
        feature_layout = "NCHW"
        scope = pick("classifier.1", "conv2d_3", "conv2d_3")
        weight = _classifier_weight(g.rng, feature_channels, num_classes)
        w = g.param(scope, "weight", weight.T.reshape(num_classes, feature_channels, 1, 1).copy())
        b = g.param(scope, "bias", (0.1 + g.small((num_classes,))).astype(np.float32))
        x = g.op("Conv", [x, w, b], scope, kernel_shape=[1, 1])
        if nhwc:
            x = g.op("Transpose", [x], scope, perm=_TO_NHWC)
            x = g.op("Relu", [x], scope)
            x = g.reduce_mean(x, [1, 2], 0, "global_average_pooling2d")
        else:
            x = g.op("Relu", [x], pick("classifier.2", "", "relu_3"))
            x = g.op("GlobalAveragePool", [x], pick("classifier.3", "", "pool2d_0"))
            x = g.op("Flatten", [x], pick("", "", "flatten_0"), axis=1)

    # ---- temperature, final activation, tail ----------------------------------------------
    extra_inputs: tuple = ()
    if extra_input:
        inputs.append(helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1]))
        extra_inputs = (("temperature", np.array([1.0], dtype=np.float32)),)
        x = g.op("Mul", [x, "temperature"], pick("", "", "scale_0"))
    logits = x
    if final is not None:
        axis = 1 if style == "torch" else -1
        attrs = {} if final == "Sigmoid" else {"axis": axis}
        x = g.op(final, [x], pick("", "predictions", final.lower() + "_0"), **attrs)
    rank = 2
    for i, op in enumerate(tail):
        scope = pick("", "tail", op.lower() + "_0")
        if op == "Identity":
            x = g.op("Identity", [x], scope)
        elif op == "Flatten":
            x, rank = g.op("Flatten", [x], scope, axis=1), 2
        elif op == "Reshape":
            following = [t for t in tail[i + 1 :] if t != "Identity"]
            shape = [-1, num_classes, 1, 1] if following[:1] == ["Squeeze"] else [-1, num_classes]
            x, rank = g.op("Reshape", [x, g.ints("Reshape", shape)], scope), len(shape)
        else:
            if rank != 4:
                raise ValueError(f"tail={tail}: Squeeze needs a Reshape to (N, K, 1, 1) before it")
            x, rank = g.op("Squeeze", [x, g.ints("Squeeze", [2, 3])], scope), 2
    if rank != 2:
        raise ValueError(
            f"tail={tail}: the output must end as (N, K); add a Squeeze after the Reshape"
        )

    output_name = pick("output", "predictions", "save_infer_model/scale_0.tmp_0")
    g.nodes[-1].output[0] = output_name
    if logits == x:
        logits = output_name
    outputs = [
        helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch_dim, num_classes])
    ]

    graph = helper.make_graph(
        g.nodes,
        pick("main_graph", "tf2onnx", "paddle-onnx"),
        inputs,
        outputs,
        initializer=g.initializers,
    )
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(
        graph,
        opset_imports=[opset_id],
        ir_version=helper.find_min_ir_version_for([opset_id]),
        producer_name=pick("pytorch", "tf2onnx", "PaddlePaddle"),
    )
    onnx.checker.check_model(model, full_check=True)

    batch = fixed_batch if fixed_batch is not None else 2
    input_shape = (batch, size, size, channels) if nhwc else (batch, channels, size, size)
    feature_shape = (
        (batch, spatial, spatial, feature_channels)
        if feature_layout == "NHWC"
        else (batch, feature_channels, spatial, spatial)
    )
    return BuiltModel(
        model=model,
        input_name=input_name,
        layout=layout,
        feature_map=feature_map,
        feature_layout=feature_layout,
        logits=logits,
        activation=final,
        num_classes=num_classes,
        input_shape=input_shape,
        feature_shape=feature_shape,
        extra_inputs=extra_inputs,
        head=head,
    )


def all_variants() -> list[tuple[str, dict]]:
    """``(id, build_cnn kwargs)`` pairs covering heads x layouts, both weight forms, symbolic
    dims, every final activation, tails, a second input, a fixed batch, opsets 13/18,
    one-channel images and HardSwish; about 40 variants for ``pytest.mark.parametrize``."""
    variants: list[tuple[str, dict]] = []
    for i, head in enumerate(HEADS):
        for layout in LAYOUTS:
            variants.append((f"{head}-{layout}", {"head": head, "layout": layout}))
        # One extra per head, rotating through weights / symbolic / final.
        final = FINALS[1 + i % 3]
        weights = WEIGHTS[i % 2]
        layout = LAYOUTS[(i + 1) % 2]
        kwargs = {
            "head": head,
            "layout": layout,
            "weights": weights,
            "symbolic": True,
            "final": final,
        }
        ident = f"{head}-{layout}-{'const' if weights == 'constant' else 'init'}-sym-{final}"
        variants.append((ident, kwargs))
    for head in HEADS:
        variants.append((f"{head}-NCHW-const", {"head": head, "weights": "constant"}))
    specials = [
        ("gap_gemm-NCHW-Softmax-tail_identity", {"final": "Softmax", "tail": ("Identity",)}),
        ("gap_gemm-NCHW-tail_reshape_squeeze", {"tail": ("Reshape", "Squeeze")}),
        (
            "reducemean_matmul-NHWC-Softmax-tail_flatten_identity",
            {
                "head": "reducemean_matmul",
                "layout": "NHWC",
                "final": "Softmax",
                "tail": ("Flatten", "Identity"),
            },
        ),
        (
            "gap_reshape_matmul-NCHW-LogSoftmax-tail_reshape",
            {"head": "gap_reshape_matmul", "final": "LogSoftmax", "tail": ("Reshape",)},
        ),
        ("gap_gemm-NCHW-extra_input", {"extra_input": True}),
        (
            "reducemean_keepdims-NHWC-Softmax-extra_input",
            {
                "head": "reducemean_keepdims",
                "layout": "NHWC",
                "final": "Softmax",
                "extra_input": True,
            },
        ),
        ("gap_gemm-NCHW-batch1", {"fixed_batch": 1}),
        (
            "flatten_mlp-NHWC-batch1-Sigmoid",
            {"head": "flatten_mlp", "layout": "NHWC", "fixed_batch": 1, "final": "Sigmoid"},
        ),
        (
            "reducemean_matmul-NHWC-opset13",
            {"head": "reducemean_matmul", "layout": "NHWC", "opset": 13},
        ),
        (
            "reducemean_keepdims-NCHW-opset13-Softmax",
            {"head": "reducemean_keepdims", "opset": 13, "final": "Softmax"},
        ),
        ("reducemean_matmul-NCHW-opset18", {"head": "reducemean_matmul", "opset": 18}),
        ("conv1x1_gap-NHWC-opset18", {"head": "conv1x1_gap", "layout": "NHWC", "opset": 18}),
        ("gap_gemm-NCHW-gray", {"channels": 1}),
        ("conv1x1_gap-NCHW-gray-sym", {"head": "conv1x1_gap", "channels": 1, "symbolic": True}),
        ("gap_gemm-NCHW-hardswish-Softmax", {"act": "hardswish", "final": "Softmax"}),
        (
            "avgpool_flatten_gemm-NCHW-size48-classes10",
            {"head": "avgpool_flatten_gemm", "size": 48, "num_classes": 10},
        ),
    ]
    variants.extend(specials)
    return variants


CAFFE2_HEADS = ("squeezenet", "googlenet")


def build_caffe2_cnn(
    *,
    head: str = "squeezenet",
    opset: int = 7,
    size: int = 32,
    num_classes: int = 5,
    width: int = 8,
    seed: int = 0,
) -> BuiltModel:
    """A classifier in the shape of the Caffe2-era model zoo (opsets 7 to 9, fixed batch 1).

    Trunk: Conv -> Relu -> LRN -> MaxPool(2) -> Conv -> BatchNormalization -> Relu ->
    [Conv -> Relu] summed with its input by ``Sum`` (a residual join) -> Dropout.
    Heads: ``squeezenet`` is Conv 1x1 (``num_classes`` out) -> Relu -> GlobalAveragePool ->
    Softmax on the (1, K, 1, 1) scores, which is also the graph output (so the logits are
    4-D); ``googlenet`` is a full-size AveragePool -> Reshape (shape initializer [1, C]) ->
    Gemm -> Softmax.  Names follow Caffe2's (``data_0``, ``conv1_w_0``, ``softmaxout_1``).
    The feature map is the Dropout output (``drop_1``); for ``squeezenet`` it is the input
    of the 1x1 classifier conv.
    """
    if head not in CAFFE2_HEADS:
        raise ValueError(f"head={head!r}: choose one of {CAFFE2_HEADS}")
    if not 7 <= opset <= 9:
        raise ValueError(f"opset={opset}: Caffe2-era models use opsets 7 to 9")
    if size < 8 or size % 2:
        raise ValueError(f"size={size}: use an even size of at least 8")
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def param(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def conv(x: str, name: str, c_in: int, c_out: int, k: int) -> str:
        w = param(
            f"{name}_w_0", rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))
        )
        b = param(f"{name}_b_0", 0.05 * rng.standard_normal(c_out))
        nodes.append(
            helper.make_node(
                "Conv", [x, w, b], [f"{name}_1"], kernel_shape=[k, k], pads=[k // 2] * 4
            )
        )
        return f"{name}_1"

    def node(op: str, inputs, out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    x = conv("data_0", "conv1", 3, width, 3)
    x = node("Relu", [x], "conv1_2")
    x = node("LRN", [x], "norm1_1", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    x = node("MaxPool", [x], "pool1_1", kernel_shape=[2, 2], strides=[2, 2])
    x = conv(x, "conv2", width, 2 * width, 3)
    c = 2 * width
    scale, bias = (
        param("bn2_s_0", 1 + 0.1 * rng.standard_normal(c)),
        param("bn2_b_0", 0.1 * rng.standard_normal(c)),
    )
    mean, var = (
        param("bn2_rm_0", 0.1 * rng.standard_normal(c)),
        param("bn2_riv_0", 1 + rng.random(c)),
    )
    bn_attrs = {"spatial": 1} if opset < 9 else {}
    x = node("BatchNormalization", [x, scale, bias, mean, var], "bn2_1", epsilon=1e-5, **bn_attrs)
    x = node("Relu", [x], "conv2_2")
    branch = node("Relu", [conv(x, "res3", c, c, 3)], "res3_2")
    x = node("Sum", [x, branch], "res3_sum_1")
    x = feature = node("Dropout", [x], "drop_1", ratio=0.5)
    spatial = size // 2
    if head == "squeezenet":
        x = conv(x, "conv10", c, num_classes, 1)
        x = node("Relu", [x], "relu10_1")
        logits = node("GlobalAveragePool", [x], "pool10_1")
        out_dims = [1, num_classes, 1, 1]
    else:
        x = node("AveragePool", [x], "pool5_1", kernel_shape=[spatial, spatial])
        x = node("Reshape", [x, "OC2_DUMMY_1"], "pool5_2")
        inits.append(numpy_helper.from_array(np.array([1, c], dtype=np.int64), "OC2_DUMMY_1"))
        w = param("fc_w_0", _classifier_weight(rng, c, num_classes).T)
        b = param("fc_b_0", 0.05 * rng.standard_normal(num_classes))
        logits = node("Gemm", [x, w, b], "fc_1", transB=1)
        out_dims = [1, num_classes]
    node("Softmax", [logits], "softmaxout_1")
    # IR version 3 lists every initializer among the graph inputs, as those models do.
    inputs = [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, 3, size, size])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(
        nodes,
        "caffe2",
        inputs,
        [helper.make_tensor_value_info("softmaxout_1", TensorProto.FLOAT, out_dims)],
        initializer=inits,
    )
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(
        graph,
        opset_imports=[opset_id],
        producer_name="onnx-caffe2",
        ir_version=helper.find_min_ir_version_for([opset_id]),
    )
    onnx.checker.check_model(model, full_check=True)
    return BuiltModel(
        model=model,
        input_name="data_0",
        layout="NCHW",
        feature_map=feature,
        feature_layout="NCHW",
        logits=logits,
        activation="Softmax",
        num_classes=num_classes,
        input_shape=(1, 3, size, size),
        feature_shape=(1, c, spatial, spatial),
        head=head,
    )
