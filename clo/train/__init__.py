"""Step 2: cross-lingual pairs -> a trained model (train.py drives it).

Four sequences per example (batching), their log-probs (scoring), the CLO / DPO / NLL losses (loss),
the starting model's log-probs cached once (reference), what trains when (stages), the precision
policy (precision), one optimizer step (step), resumable checkpoints (resume) and the run folder
(run). Imports model and the floor; never eval or translate.
"""
