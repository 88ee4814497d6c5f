"""Evaluation while training (filled in when clipkit.eval lands)."""
def evaluate(model, bundle, data_cfg, accelerator):
    return {}
