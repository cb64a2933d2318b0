"""flows of neuron-embeddings."""
