"""neuron-embeddings: neuron embeddings, clustering and polysemanticity metrics for every MLP neuron."""

__version__ = "0.1.0"
