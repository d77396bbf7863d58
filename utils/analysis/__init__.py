"""The paper's analysis: measurements during training (TrainingMonitor; c2i_reference, the
weights C2I counts from), the loss landscape (`python -m utils.analysis.landscape`) and the
small-scale findings (`python -m utils.analysis.findings`). See docs/analysis.md."""
from .monitor import TrainingMonitor, c2i_reference

__all__ = ["TrainingMonitor", "c2i_reference"]
