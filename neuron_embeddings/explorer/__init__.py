"""The results explorer: a local web app over a store (`neuron-embeddings explore STORE`).

- `data`: reads a store for the pages, one neuron's chunks at a time (plus cached per-layer metrics
  and a token index for search); pure helpers for centrality, windows and token text.
- `plots`: inline SVG histograms and dendrograms.
- `importance`: token importance with the model (`--model`), batched in one forward, cached.
- `app`: the FastAPI app (server-side HTML, no JavaScript framework, works offline).
"""
