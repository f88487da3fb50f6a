"""Serving: the embedded default model, the chat template, the shared generation worker and the
registry of model versions. It never knows about votes."""
