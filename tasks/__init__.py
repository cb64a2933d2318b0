"""tasks of neuron-embeddings."""
