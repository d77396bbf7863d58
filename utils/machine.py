"""The machine a measurement ran on, as the benchmarks print it beside their figures: the CPU's
name and the load average (utils/bench, and `python -m utils.export --benchmark`)."""
import os
import platform

__all__ = ["cpu_name", "load_average"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"
