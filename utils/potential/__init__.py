"""A draft's potential measured in advance (`test_greedyS_logit.py`): `figures` defines every figure as a pure
function of target and draft logits (KL, expected acceptance, agreement); `report` scores prompts with loaded
models and prints and ranks the results. May import utils plumbing and engine/."""
