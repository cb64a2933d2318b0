"""Ground truth: how well neuron embeddings recover known features (issue 6).

Generators of models whose features are known (``planted``: transformers with planted neurons run
through the real pipeline; ``toy``: a trained toy model of superposition), per-neuron measures
against the truth with baselines (``measures``, ``ari``), the benchmark driver and its report
(``benchmark``, ``report``; ``neuron-embeddings benchmark ground-truth``).
"""
