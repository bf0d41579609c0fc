"""The one place that imports TensorFlow, so that Keras 2 is guaranteed."""

from __future__ import annotations

from types import ModuleType

from fallopt.errors import FalloptError


def keras() -> ModuleType:
    """Return `tf_keras`, after checking that `tf.keras` (used by tfmot) is the same Keras 2."""
    import tensorflow as tf
    import tf_keras

    if tf.keras.Model is not tf_keras.Model:
        raise FalloptError(
            "tf.keras is Keras 3, but tensorflow-model-optimization needs Keras 2: "
            "import fallopt before touching tf.keras, or set TF_USE_LEGACY_KERAS=1"
        )
    return tf_keras
