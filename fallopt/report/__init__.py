"""`python -m fallopt.report`: which model to put on the device, from the runs in MLflow."""

from fallopt.report.build import Report, build_report
from fallopt.report.select import Constraints, Recommendation, recommend

__all__ = ["Constraints", "Recommendation", "Report", "build_report", "recommend"]
