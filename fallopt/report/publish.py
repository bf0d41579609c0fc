"""Where a report goes besides disk: the sweep's parent run and the model registry."""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from fallopt.report.build import Report

log = logging.getLogger("fallopt.report")


def publish(client: MlflowClient, parent: str, report: Report, scope: tuple[str, ...] = ()) -> None:
    """Log the report's files to the sweep's parent run under `report/` (`report/<scope>/`).

    Only the files the report wrote: its folder may hold anything, even the store itself.
    A report of one data set or for one board (`scope`: the data set, then the board) gets
    its own folder and tag, so the sweep's other reports stay.
    """
    folder = "/".join(["report", *scope])
    for path in report.files:
        client.log_artifact(parent, str(path), folder)
    if report.recommendation.run_id:
        tag = ".".join(["fallopt.recommended_run_id", *scope])
        client.set_tag(parent, tag, report.recommendation.run_id)
    log.info("[report] logged to run %s under %s/", parent, folder)


def register(client: MlflowClient, name: str, run_id: str) -> tuple[str, str]:
    """Register the run's .tflite as model `name` and its Keras model as `name`-keras.

    Returns the two new version numbers.
    """
    artifacts = client.get_run(run_id).info.artifact_uri.rstrip("/")
    versions = []
    for model, path in ((name, "model.tflite"), (f"{name}-keras", "model/model.keras")):
        if not client.search_registered_models(f"name = '{model}'"):
            client.create_registered_model(model, description="registered by fallopt.report")
        version = client.create_model_version(
            model, source=f"{artifacts}/{path}", run_id=run_id, tags={"file": path}
        )
        versions.append(version.version)
        log.info("[report] registered %s version %s: run %s, %s", model, version.version,
                 run_id, path)  # fmt: skip
    return versions[0], versions[1]
