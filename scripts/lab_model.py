"""The lab's notebook: train its CAUCA CNN on the lab's pickles and save `best_CNN.keras`.

As the students did it: plain `pickle.load`, raw 0..255 float pixels (the lab never divides
by 255), Keras `fit` on arrays. `--keras 3` builds and saves with Keras 3 (`import keras`,
TensorFlow's default since 2.16: what most users have); `--keras 2` with tf_keras, as an
`.h5` file of the lab's era. It prints the saved file's own test accuracy, which fallopt's
`baseline_test_accuracy` must equal:

    python scripts/lab_model.py --train data_train_96_96_3.pickle \
        --test data_test_96_96_3.pickle --keras 3 --out best_CNN.keras
    python -m fallopt.run model=keras_file model.path=best_CNN.keras model.input_range=[0,255] \
        dataset=cauca dataset.train_path=... dataset.test_path=...

It imports nothing from fallopt, so it checks fallopt independently.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The lab's pickle as float32 raw pixels (n, h, w, c) and integer labels."""
    with path.open("rb") as f:
        raw = pickle.load(f)
    shape = (-1, raw["height"], raw["width"], raw["channels"])
    return np.asarray(raw["data"]).reshape(shape).astype(np.float32), np.asarray(raw["labels"])


def lab_cnn(layers, models, input_shape: tuple[int, ...]):  # noqa: ANN001, ANN201
    """3 x (Conv2D 5x5 relu -> BatchNorm -> MaxPool), 32/32/64 filters, Dense 64, softmax."""
    stack = [layers.Input(shape=input_shape)]
    for filters in (32, 32, 64):
        stack += [
            layers.Conv2D(filters, 5, activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(2),
        ]
    stack += [layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(2, "softmax")]
    return models.Sequential(stack)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--keras", choices=["2", "3"], default="3")
    p.add_argument("--out", type=Path, required=True, help="best_CNN.keras, or a .h5 for Keras 2")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.keras == "3":
        import keras
    else:
        import tf_keras as keras
    keras.utils.set_random_seed(args.seed)
    x, y = read(args.train)
    x_test, y_test = read(args.test)
    model = lab_cnn(keras.layers, keras.models, x.shape[1:])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=32, epochs=args.epochs, validation_split=0.2, verbose=2)
    model.save(args.out)
    predicted = model.predict(x_test, verbose=0).argmax(axis=1)
    print(f"params {model.count_params()}")
    print(f"test_accuracy {float(np.mean(predicted == y_test))!r}")


if __name__ == "__main__":
    main()
