"""Training: stored feedback -> TRL datasets -> reward model + preference tuning -> gate -> version.

`python -m training run` is one round; nothing it does changes what is serving unless the
candidate passed the gate (`evaluate.py`).
"""
