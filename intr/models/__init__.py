"""Models: Prompt-CAM and INTR behind one interface, one factory and one checkpoint loader."""

from intr.models.checkpoint import CheckpointError, check_classes, load_model, read_checkpoint
from intr.models.factory import METHODS, build_model, resolve_device
from intr.models.protocol import BlurContext, InterpretableModel, Trunk

__all__ = ["METHODS", "BlurContext", "CheckpointError", "InterpretableModel", "build_model", "check_classes",
           "load_model", "read_checkpoint", "resolve_device", "Trunk"]
