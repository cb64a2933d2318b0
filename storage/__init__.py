"""storage of neuron-embeddings."""
