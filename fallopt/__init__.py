"""fallopt: shrink a CNN for an embedded device and measure what it costs in accuracy."""

import os

from fallopt.backend import native_logs

# tfmot works only with Keras 2 (tf-keras). TensorFlow reads this when `tf.keras` is first
# touched, so it must be set before any fallopt module imports TensorFlow: here, whichever
# entry point (CLI, tests, notebooks) imports the package first.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# For the same reason TensorFlow's native log lines are quieted here; `python -m fallopt.run
# verbose=true` shows them again.
native_logs(verbose=False)
# MLflow's HTTP client retries a tracking server that is gone for about 4 minutes per request
# (7 retries, then a 120 s timeout), and a failing job makes several: a job then hung for
# most of an hour before it could fail. These settle it in about 15 s, which still rides out
# a server's restart. Set them yourself to choose otherwise.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")

__version__ = "0.1.0"
