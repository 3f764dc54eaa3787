"""egma_model: the thin EGMA model layer (encoders, gaze preprocessing, data, training, evaluation).

Built on ``egma_kernels.fine_grained_loss``; filled in by the model-layer issue.
"""
