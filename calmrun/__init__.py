"""calmrun: a Kafka-native runtime for AI-agent workflows: deterministic, replayable, cost-observable."""

from calmrun.errors import CalmrunError

__version__ = "0.1.0"
__all__ = ["CalmrunError", "__version__"]
