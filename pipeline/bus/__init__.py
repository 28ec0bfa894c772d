"""The transport between roles: one small interface, an in-process implementation
(the embedded default) and, next, Kafka."""

from pipeline.bus.base import Bus, EndOfStream, Message, Subscription, Topic
from pipeline.bus.memory import MemoryBus

__all__ = ["Bus", "EndOfStream", "MemoryBus", "Message", "Subscription", "Topic"]
