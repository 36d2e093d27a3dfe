#!/usr/bin/env python
"""The Keras part of the test zoo (tests/fixtures/zoo): Keras models through tf2onnx.

Dev-only, and the only place TensorFlow is used: run by ``scripts/make_zoo.py --keras``
under a separate Python with TensorFlow, tf_keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``)
and tf2onnx, so that the main environment's onnx / numpy / protobuf stay untouched::

    python -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu tf_keras tf2onnx pillow

This script does not import onnx_sp2ps (nor onnxruntime): it reads the already
preprocessed images (NHWC float32, written by make_zoo.py with onnx_sp2ps' own image
pipeline), and for every entry writes

- ``OUT/<name>.onnx``: tf2onnx's conversion (``from_keras``, the opset of the entry);
- ``OUT/<name>.keras.npz``: the Keras logits (before the final softmax), the own top-1
  targets, the reference Grad-CAM raw maps at feature resolution (tf.GradientTape on the
  output of the layer whose tensor onnx-sp2ps should detect: weights = spatial mean of
  d logit_target / dA, map = ReLU(sum_k w_k A_k)) and that layer's output (``feature``),
  which make_zoo.py matches against the ONNX graph's tensors to name the expected one;
- ``OUT/keras_entries.json``: name, family, opset, layer, preprocessing, versions.

Usage: ``TF_USE_LEGACY_KERAS=1 /tmp/tfvenv/bin/python scripts/make_zoo_keras.py
--inputs INPUTS.npz --out DIR [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
import tf_keras as keras  # noqa: E402
from tf_keras import layers as L  # noqa: E402

K = 4


def randomize(model: keras.Model, seed: int, x: np.ndarray) -> None:
    """Non-degenerate random weights: BN affine parameters, biases and LayerNorm
    parameters re-drawn (Keras initialises them to 0 / 1); then the BN statistics are
    those of the images themselves (one forward pass in training mode with momentum 0),
    times random factors: with drawn statistics alone the deep ReLU6 nets saturate and
    every image gets the same logits."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, g.shape).astype(np.float32),
                    rng.uniform(-0.2, 0.2, b.shape).astype(np.float32),
                    rng.uniform(-0.2, 0.2, m.shape).astype(np.float32),
                    rng.uniform(0.5, 1.5, v.shape).astype(np.float32),
                ]
            )
        elif isinstance(layer, L.LayerNormalization):
            g, b = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, g.shape).astype(np.float32),
                    rng.uniform(-0.2, 0.2, b.shape).astype(np.float32),
                ]
            )
        elif isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.Dense)) and layer.use_bias:
            w = layer.get_weights()
            w[-1] = rng.uniform(-0.1, 0.1, w[-1].shape).astype(np.float32)
            layer.set_weights(w)
        elif isinstance(layer, L.MultiHeadAttention):
            layer.set_weights(
                [
                    rng.uniform(-0.1, 0.1, w.shape).astype(np.float32) if "bias" in v.name else w
                    for w, v in zip(layer.get_weights(), layer.weights)
                ]
            )
    bns = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    if bns:
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.momentum = 0.0
        model(x, training=True)
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
            g, b, m, v = bn.get_weights()
            m = m + rng.uniform(-0.1, 0.1, m.shape) * np.sqrt(v)
            v = v * rng.uniform(0.7, 1.4, v.shape)
            bn.set_weights([g, b, m.astype(np.float32), v.astype(np.float32)])


# -- models ----------------------------------------------------------------------------------


def mobilenet_v2() -> tuple[keras.Model, str]:
    """keras.applications.MobileNetV2 itself (alpha 0.35): ReLU6, ZeroPadding, depthwise."""
    m = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, weights=None, classes=K)
    return m, "out_relu"


def efficientnet_b0_small() -> tuple[keras.Model, str]:
    """keras.applications' EfficientNet builder (Rescaling + Normalization inside, swish,
    SE), width 0.25 and the first four block groups once each: inputs in 0..255."""
    from tf_keras.src.applications import efficientnet

    blocks = [dict(b, repeats=1) for b in efficientnet.DEFAULT_BLOCKS_ARGS[:4]]
    m = efficientnet.EfficientNet(
        0.25,
        1.0,
        64,
        blocks_args=blocks,
        model_name="efficientnet_small",
        input_shape=(64, 64, 3),
        weights=None,
        classes=K,
    )
    # Normalization is not adapted in an untrained model (mean 0, variance 1 for the
    # applications' default): give it ImageNet-like statistics in pixel/255 units.
    norm = next(x for x in m.layers if isinstance(x, L.Normalization))
    count = norm.get_weights()[2]
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    norm.set_weights([mean, np.array([0.052, 0.050, 0.051], np.float32), count])
    return m, "top_activation"


def resnet_small() -> tuple[keras.Model, str]:
    """ResNet50's structure (keras.applications.resnet: ZeroPadding stem, MaxPool,
    bottleneck blocks with a projection shortcut), two stages of one block, narrow."""
    inp = keras.Input((64, 64, 3))
    x = L.ZeroPadding2D(3, name="conv1_pad")(inp)
    x = L.Conv2D(16, 7, strides=2, name="conv1_conv")(x)
    x = L.BatchNormalization(epsilon=1.001e-5, name="conv1_bn")(x)
    x = L.Activation("relu", name="conv1_relu")(x)
    x = L.ZeroPadding2D(1, name="pool1_pad")(x)
    x = L.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    def block(x, filters, stride, name):
        sc = L.Conv2D(4 * filters, 1, strides=stride, name=name + "_0_conv")(x)
        sc = L.BatchNormalization(epsilon=1.001e-5, name=name + "_0_bn")(sc)
        x = L.Conv2D(filters, 1, strides=stride, name=name + "_1_conv")(x)
        x = L.BatchNormalization(epsilon=1.001e-5, name=name + "_1_bn")(x)
        x = L.Activation("relu", name=name + "_1_relu")(x)
        x = L.Conv2D(filters, 3, padding="SAME", name=name + "_2_conv")(x)
        x = L.BatchNormalization(epsilon=1.001e-5, name=name + "_2_bn")(x)
        x = L.Activation("relu", name=name + "_2_relu")(x)
        x = L.Conv2D(4 * filters, 1, name=name + "_3_conv")(x)
        x = L.BatchNormalization(epsilon=1.001e-5, name=name + "_3_bn")(x)
        x = L.Add(name=name + "_add")([sc, x])
        return L.Activation("relu", name=name + "_out")(x)

    x = block(x, 8, 1, "conv2_block1")
    x = block(x, 16, 2, "conv3_block1")
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    x = L.Dense(K, activation="softmax", name="predictions")(x)
    return keras.Model(inp, x, name="resnet_small"), "conv3_block1_out"


def vit_small() -> tuple[keras.Model, str]:
    """A Keras ViT in the style of keras.io's example: patches by a strided Conv2D,
    a learned position embedding, pre-norm blocks of MultiHeadAttention and an MLP,
    mean-pooled tokens (no class token) -> LayerNorm -> Dense."""
    dim, grid = 32, 8

    class AddPosition(L.Layer):
        def build(self, shape):
            self.pos = self.add_weight(
                name="pos",
                shape=(1, shape[1], shape[2]),
                initializer=keras.initializers.RandomNormal(stddev=0.5),
            )

        def call(self, x):
            return x + self.pos

    def gelu_tanh(t):  # (tf2onnx has no conversion for the exact GELU's Erfc)
        return tf.nn.gelu(t, approximate=True)

    inp = keras.Input((64, 64, 3))
    x = L.Conv2D(dim, 8, strides=8, name="patch_embed")(inp)
    x = L.Reshape((grid * grid, dim), name="tokens")(x)
    x = AddPosition(name="pos_embed")(x)
    for i in range(2):
        y = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm1")(x)
        y = L.MultiHeadAttention(2, dim // 2, name=f"block{i}_attn")(y, y)
        x = L.Add(name=f"block{i}_add1")([x, y])
        y = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm2")(x)
        y = L.Dense(2 * dim, activation=gelu_tanh, name=f"block{i}_fc1")(y)
        y = L.Dense(dim, name=f"block{i}_fc2")(y)
        x = L.Add(name=f"block{i}_add2")([x, y])
    x = L.GlobalAveragePooling1D(name="pool")(x)
    x = L.LayerNormalization(epsilon=1e-6, name="norm")(x)
    x = L.Dense(K, name="head")(x)
    x = L.Activation("softmax", name="softmax")(x)
    return keras.Model(inp, x, name="vit_small"), "block1_add2"  # pooled head: last block


# name: (family, builder, opset, preprocessing preset, token info or None)
ENTRIES = {
    "keras_mobilenetv2_tf13": ("MobileNetV2", mobilenet_v2, 13, "unit", None),
    "keras_resnet_tf13": ("ResNet50-style", resnet_small, 13, "unit", None),
    "keras_resnet_tf17": ("ResNet50-style", resnet_small, 17, "unit", None),
    "keras_efficientnet_tf17": ("EfficientNetB0-style", efficientnet_b0_small, 17, "raw", None),
    "keras_vit_tf17": ("ViT (Keras)", vit_small, 17, "unit", {"prefix": 0, "grid": [8, 8]}),
}


def pre_softmax(model: keras.Model) -> keras.Model:
    """The same weights, the logits before the final softmax as the output."""
    last = model.layers[-1]
    if isinstance(last, L.Activation):
        return keras.Model(model.input, last.input)
    if isinstance(last, L.Dense) and last.activation is keras.activations.softmax:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        clone.layers[-1].activation = keras.activations.linear
        return clone
    return model


def gradcam(model: keras.Model, layer: str, x: np.ndarray, token: dict | None):
    """tf.GradientTape Grad-CAM raw maps at the layer's resolution (ReLU'd)."""
    logits_model = pre_softmax(model)
    probe = keras.Model(
        logits_model.input, [logits_model.get_layer(layer).output, logits_model.output]
    )
    feature, logits = probe(x)
    targets = np.argmax(logits.numpy(), axis=1)
    with tf.GradientTape() as tape:
        feature, logits = probe(x)
        chosen = tf.reduce_sum(tf.gather(logits, targets, axis=1, batch_dims=1))
    grads = tape.gradient(chosen, feature).numpy().astype(np.float64)
    a = feature.numpy().astype(np.float64)
    if token is not None:  # (N, L, C) tokens -> (N, h, w, C) grid after the prefix
        h, w = token["grid"]
        p = token["prefix"]
        a = a[:, p:].reshape(len(a), h, w, -1)
        grads = grads[:, p:].reshape(len(a), h, w, -1)
    weights = grads.mean(axis=(1, 2))  # (N, C)
    raw = np.maximum(np.einsum("nhwc,nc->nhw", a, weights), 0)
    return raw.astype(np.float32), targets, logits.numpy(), feature.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = np.load(args.inputs)
    rows = []
    for name, (family, build, opset, preset, token) in ENTRIES.items():
        if args.only and name not in args.only:
            continue
        for seed in range(10):
            keras.backend.clear_session()
            keras.utils.set_random_seed(seed)
            model, layer = build()
            x = data["nhwc_raw" if preset == "raw" else "nhwc_unit"]
            randomize(model, seed, x)
            raw, targets, logits, feature = gradcam(model, layer, x, token)
            spread = logits.std(axis=0).max() / (np.abs(logits).max() + 1e-12)
            if (
                len(set(targets.tolist())) >= 2
                and spread > 1e-3
                and (raw.reshape(len(raw), -1).max(1) > 0).all()
            ):
                break
        else:
            raise SystemExit(f"{name}: no healthy seed in 10")
        spec = (tf.TensorSpec((None, 64, 64, 3), tf.float32, name="input"),)
        onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
        (args.out / f"{name}.onnx").write_bytes(onnx_model.SerializeToString())
        np.savez_compressed(
            args.out / f"{name}.keras.npz",
            raw=raw,
            targets=targets.astype(np.int64),
            logits=logits.astype(np.float32),
            feature=feature.astype(np.float32),
        )
        rows.append(
            {
                "name": name,
                "family": family,
                "exporter": f"tf2onnx {tf2onnx.__version__}",
                "opset": opset,
                "layer": layer,
                "preprocess": preset,
                "seed": seed,
                "tokens": token,
                "parameters": int(model.count_params()),
                "versions": {
                    "tensorflow": tf.__version__,
                    "tf_keras": keras.__version__,
                    "tf2onnx": tf2onnx.__version__,
                },
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "keras_entries.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
