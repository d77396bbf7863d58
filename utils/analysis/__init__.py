"""The paper's analysis: measurements during training (TrainingMonitor), the loss landscape
(`python -m utils.analysis.landscape`) and the small-scale findings
(`python -m utils.analysis.findings`). See docs/analysis.md."""
from .monitor import TrainingMonitor

__all__ = ["TrainingMonitor"]
