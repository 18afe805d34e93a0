"""Models: Prompt-CAM and INTR."""
