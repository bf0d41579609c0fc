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


def set_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools. Once TensorFlow has run, the first cap stays."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:  # already initialized: a worker's earlier job set the same cap
        pass
